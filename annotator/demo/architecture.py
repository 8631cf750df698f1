"""The demo model: a small Florence-2 of the native architecture, trained by the project on its
synthetic world (annotator/demo/world.py) and shipped inside the package, so `--model demo` really
annotates offline.

This module owns its architecture, its tokenizer (a small byte-level BPE over the world's words:
BART's 50k vocabulary alone would not fit the size budget) and the initialisation that makes it
learn to localise in minutes on a CPU. `examples/train_demo.py` trains it.
"""

from __future__ import annotations

import copy
import math

import torch

from annotator.model.sequence import LOC_TOKENS
from annotator.tasks import DEMO_TASKS


IMAGE_SIZE = 384

# A first stride of 8 (not 4) and a last of 1 (not 2): a 12x12 grid of image tokens at a third of
# the cost; the first stage at stride 4 took 70% of a training step and added nothing to shapes.
VISION = dict(depths=[1, 1, 2, 1], embed_dim=[32, 64, 128, 192], num_heads=[1, 2, 4, 6], num_groups=[1, 2, 4, 6],
              patch_size=[9, 3, 3, 3], patch_stride=[8, 2, 2, 1], patch_padding=[4, 1, 1, 1],
              window_size=6, projection_dim=256, drop_path_rate=0.0)
GRID = IMAGE_SIZE // 32  # 8 * 2 * 2 * 1
TEXT = dict(d_model=256, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=1024, decoder_ffn_dim=1024, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
            max_position_embeddings=1024, init_std=0.02, scale_embedding=False)


def demo_words() -> list[str]:
    """Every word the demo model reads or writes, so the tokenizer keeps each whole."""
    from annotator.demo import world as samples

    prompts = [
        "What is the text in the image?", "What is the text in the image, with regions?",
        "What does the image describe?", "Describe in detail what is shown in the image.",
        "Describe with a paragraph what is shown in the image.", "Locate the objects with category name in the image.",
        "Locate the objects in the image, with their descriptions.", "Locate the region proposals in the image.",
        "Locate the phrases in the caption:", "Locate in the image with mask", "What is the polygon mask of region",
        "What is the region?", "What does the region describe?", "What text is in the region?",
    ]
    return prompts + samples.vocabulary()


def build_tokenizer():
    """Byte-level BPE whose merges cover the world's words (each alone and with a leading space:
    both forms occur in answers), plus Florence-2's task and location tokens and `<image>`."""
    from annotator.model.load import florence_tokenizer

    return florence_tokenizer([w for text in demo_words() for w in (text, " " + text)] * 2, vocab_size=1500)


def build_processor():
    from transformers import Florence2Processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from annotator.model.sequence import POST_PROCESSOR_CONFIG

    image_processor = CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_center_crop=False, do_resize=True, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True,
        image_seq_length=GRID * GRID + 1,  # +1: the projector's mean token
    )
    return Florence2Processor(image_processor=image_processor, tokenizer=build_tokenizer(),
                              post_processor_config=POST_PROCESSOR_CONFIG)


def build_model(processor, seed: int = 0):
    """The untrained demo model, with two pieces of structure a random init lacks (the reason a
    small Florence-2 trained from scratch does not learn to localise in minutes):
    - the 2-D position embedding of the image features starts as sinusoids as strong as the
      features themselves (at the default 0.02 scale the decoder cannot tell where a token is);
    - the `<loc_i>` embeddings (tied to the output layer) start as a tent code of i, so
      neighbouring bins start similar and a nearly right box is nearly right to the loss too."""
    from transformers import Florence2Config, Florence2ForConditionalGeneration, GenerationConfig

    tok = processor.tokenizer
    text = dict(TEXT, vocab_size=len(tok), bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                forced_bos_token_id=0, forced_eos_token_id=2)
    config = Florence2Config(vision_config=dict(VISION), text_config=text, image_token_id=tok.image_token_id)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config)
    _init_position_embedding(model)
    _init_location_embeddings(model, tok)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, decoder_start_token_id=2, forced_bos_token_id=0,
        forced_eos_token_id=2, num_beams=3, max_new_tokens=1024, no_repeat_ngram_size=0,
    )
    return model


def sinusoids(positions: torch.Tensor, dim: int, longest: float) -> torch.Tensor:
    """[N] positions -> [N, dim] sin/cos pairs with periods from 4 up to `longest` (geometric)."""
    periods = torch.logspace(math.log10(4.0), math.log10(longest), dim // 2)
    angles = positions[:, None].float() * (2 * math.pi / periods)[None]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)


@torch.no_grad()
def _init_position_embedding(model) -> None:
    pos = model.model.multi_modal_projector.image_position_embed
    for table in (pos.row_embeddings, pos.column_embeddings):
        n, dim = table.weight.shape
        table.weight.copy_(sinusoids(torch.arange(n), dim, longest=4 * GRID))


@torch.no_grad()
def _init_location_embeddings(model, tokenizer) -> None:
    """`<loc_i>` as a tent code: 128 overlapping hat functions 8 bins apart in the first 128
    dimensions, zero elsewhere. Through the tied output layer, a decoder state that holds the hat code
    of a coordinate gives logits peaked at that coordinate, and a hat code is what a ReLU network
    computes easily from a coordinate it holds as one number. Sinusoids (periods 4 to 4000 bins)
    learned far slower: their fine periods are not smooth functions of an object's position."""
    emb = model.get_input_embeddings().weight  # [V, d], tied to lm_head
    ids = tokenizer.convert_tokens_to_ids(LOC_TOKENS)
    emb[ids] = tent_code(torch.arange(1000).float(), emb.shape[1])


def tent_code(bins: torch.Tensor, dim: int, hats: int = 128) -> torch.Tensor:
    centres = torch.linspace(0, 999, hats)
    width = centres[1] - centres[0]
    code = torch.zeros(len(bins), dim)
    code[:, :hats] = (1 - (bins[:, None] - centres[None]).abs() / width).clamp(min=0)
    return code


def half(model):
    """A float16 copy for shipping, its config saying so throughout: save_pretrained updates only the
    top-level dtype, so the text and vision configs kept saying float32."""
    out = copy.deepcopy(model).half()
    for config in (out.config, getattr(out.config, "text_config", None), getattr(out.config, "vision_config", None)):
        if config is not None:
            config.dtype = torch.float16
    return out


# What the card says about the generation config build_model gives the demo model (its own, not the published one).
GENERATION_NOTE = (
    "Generation settings (`generation_config.json`): its own, not the published checkpoints'. As theirs: "
    "`num_beams 3` (`annotate run --num-beams` decides anyway), forced `<s>` first and `</s>` last. Its own: "
    "`no_repeat_ngram_size 0` (the published: 3), `early_stopping` unset, i.e. false (the published: true), "
    f"`max_new_tokens 1024`, and {IMAGE_SIZE} px images ({GRID}x{GRID} + 1 image tokens; the published: 768 px, 577). "
    "Its quality figures are measured with these; `annotate run --no-repeat-ngram-size 3` applies the published rule."
)


def model_card(args: dict, log: list[dict]) -> str:
    """The README.md saved next to the weights: what the model is and how it was made (the held-out
    figures are added by `python -m annotator.readback.quality --card`)."""
    last = log[-1] if log else {}
    return "\n".join([
        "# florence-annotate demo model",
        "",
        f"A small Florence-2 (native `Florence2ForConditionalGeneration`, {IMAGE_SIZE} px input, {GRID}x{GRID} image "
        "tokens) trained from scratch by florence-annotate on its synthetic world (`annotate samples`: coloured "
        "circles, squares, triangles and stars on flat, gradient and noise backgrounds; pages of printed words). It "
        "knows that world only: use it to try the tool offline, never for real images.",
        "",
        "Tasks: " + ", ".join(f"`{t}`" for t in DEMO_TASKS) + " (grounding: a `colour shape` phrase).",
        "",
        GENERATION_NOTE,
        "",
        "## Training (this stage)",
        "",
        "`python examples/train_demo.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(args.items())
                                                   if v not in (None, "None", "False")) + "`",
        "",
        f"Every batch freshly drawn; last logged: {last}.",
    ]) + "\n"
