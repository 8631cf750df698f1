"""The progress bar every launcher shows: tqdm behind the runner's Progress protocol."""

from __future__ import annotations

from tqdm import tqdm


class Bar:
    """tqdm behind the runner's Progress protocol: images/s and ETA once the total is known."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None

    def start(self, total: int) -> None:
        self.bar = tqdm(total=total, unit="img", disable=not self.enabled, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
