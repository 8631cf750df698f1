"""Florence-2 itself: loading, converting original checkpoints, the location-token sequence, CPU kernels."""


class ModelLoadError(RuntimeError):
    """Loading failed in a way the user can fix; the message says how."""


DEMO_NAME = "demo"  # the project's own small model, shipped inside the package (annotator/demo_model)
