"""The opt-in approximate int8 vision path (vision.quantize_vision_int8): only the vision tower's and projector's
linears are quantized, and the vision states stay close to the exact path's (an approximate path: its bound is
stated here, its error on the real tower is measured by bench/bench_vision_ttft.py --int8)."""
import torch
from torch import nn

import llama_mm
from llama_mm.vision import quantize_vision_int8
from checkpoints import build_reference, random_inputs, write_checkpoint

INT8_RELATIVE_ERROR = 0.05  # int8 weights (per-channel scales) and activations (per-tensor, per call)


def test_int8_vision_close_to_exact_and_text_untouched(tmp_path):
    ref = build_reference(seed=41)
    model = llama_mm.load_model(write_checkpoint(tmp_path, ref))
    inputs = random_inputs(ref, aspect_ratios=((2, 2),), seed=3)
    args = (inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"])
    with torch.inference_mode():
        exact = model.vision_states(*args)
        text_logits = model(inputs["input_ids"]).logits
    vision_linears = sum(isinstance(m, nn.Linear) for m in model.vision_model.modules()) + 1  # + the projector
    quantize_vision_int8(model)
    quantized = [n for n, m in model.named_modules() if type(m).__name__ == "Linear" and "quantized" in type(m).__module__]
    assert len(quantized) == vision_linears
    assert all(n.startswith(("vision_model.", "multi_modal_projector")) for n in quantized)
    with torch.inference_mode():
        approx = model.vision_states(*args)
        assert torch.equal(model(inputs["input_ids"]).logits, text_logits)  # text-only path unchanged
    rel = float((approx - exact).norm() / exact.norm())
    print(f"int8 vision states relative error {rel:.4f}")
    assert 0 < rel < INT8_RELATIVE_ERROR
