"""fp32 logits of llama_mm's PyTorch model against transformers' MllamaForConditionalGeneration (the oracle) on
tiny random checkpoints with every parameter randomised."""
import pytest
import torch

import llama_mm
from checkpoints import build_reference, random_inputs, write_checkpoint

TOL = 1e-5  # max abs diff / max abs value


def rel_diff(ref: torch.Tensor, got: torch.Tensor, valid: torch.Tensor | None = None) -> float:
    if valid is not None:
        ref, got = ref[valid.bool()], got[valid.bool()]
    return ((ref - got).abs().max() / ref.abs().max()).item()


def compare(ref_model, ours, inputs, valid=None) -> float:
    with torch.no_grad():
        ref = ref_model(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == ref.shape
    diff = rel_diff(ref, got, valid)
    print(f"max rel diff {diff:.2e}")
    assert diff < TOL
    return diff


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = build_reference(attn_implementation="sdpa")
    path = write_checkpoint(tmp_path_factory.mktemp("ck"), ref)
    return ref, llama_mm.load_model(path)


ASPECT_RATIOS = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_each_aspect_ratio(pair, ratio):
    ref, ours = pair
    compare(ref, ours, random_inputs(ref, aspect_ratios=(ratio,), seed=hash(ratio) % 1000))


def test_image_path_is_live(pair):
    """Guards the comparison itself: the image and the tile layout must change the logits."""
    ref, ours = pair
    a = random_inputs(ref, aspect_ratios=((2, 2),), seed=3)
    b = dict(a, pixel_values=a["pixel_values"].flip(-1))
    c = dict(a, aspect_ratio_ids=torch.full_like(a["aspect_ratio_ids"], 8))  # (4, 1): same 4 tiles, other ids
    text = {k: a[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        la, lb, lc, lt = (ours(**x).logits for x in (a, b, c, text))
    for other in (lb, lc, lt):
        assert rel_diff(la, other) > 1e-2


def test_text_only(pair):
    ref, ours = pair
    compare(ref, ours, random_inputs(ref, with_image=False, seq=16))


def test_two_images_in_one_prompt(pair):
    ref, ours = pair
    compare(ref, ours, random_inputs(ref, images_per_row=2, aspect_ratios=((1, 2), (3, 1)), seq=14))


def test_padded_batch_of_two(pair):
    ref, ours = pair
    inputs = random_inputs(ref, batch=2, seq=12, left_pad=(4, 0), aspect_ratios=((2, 1), (1, 1)))
    valid = inputs["attention_mask"]
    compare(ref, ours, inputs, valid)
    # generation-style positions (counting only real tokens)
    positions = (valid.cumsum(-1) - 1).clamp(min=0)
    compare(ref, ours, dict(inputs, position_ids=positions), valid)


def test_row_with_fewer_images(pair):
    """Row 1 has one image, row 0 two: row 1's second image slot is all padding (id 0, empty mask)."""
    ref, ours = pair
    inputs = random_inputs(ref, batch=2, seq=14, images_per_row=2, aspect_ratios=((1, 2), (2, 2), (3, 1), (1, 1)))
    inputs["pixel_values"][1, 1] = 0
    inputs["aspect_ratio_ids"][1, 1] = 0
    inputs["aspect_ratio_mask"][1, 1] = 0
    inputs["cross_attention_mask"][1, :, 1] = 0
    compare(ref, ours, inputs)


def test_rows_before_the_image_see_no_image(pair):
    """Text before the first <|image|> has an all-zero cross-attention mask row (the MLP output of cross layers is
    dropped there): a chat-template shaped prompt."""
    ref, ours = pair
    inputs = random_inputs(ref, seq=12, aspect_ratios=((1, 3),))
    xmask = torch.zeros_like(inputs["cross_attention_mask"])
    xmask[:, 5:, 0, :3] = 1
    compare(ref, ours, dict(inputs, cross_attention_mask=xmask))


def test_eager_attention_reference(tmp_path):
    ref = build_reference(attn_implementation="eager", seed=5)
    ours = llama_mm.load_model(write_checkpoint(tmp_path, ref))
    compare(ref, ours, random_inputs(ref, aspect_ratios=((1, 3),)))


@pytest.mark.parametrize(
    "text,vision",
    [
        pytest.param(dict(num_key_value_heads=4), {}, id="multi-head-attention"),
        pytest.param(dict(num_key_value_heads=1), {}, id="multi-query-attention"),
        pytest.param(dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0)), {}, id="default-rope"),
        pytest.param(dict(cross_attention_layers=[0, 3]), {}, id="cross-first-and-last"),
        pytest.param({}, dict(max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]), id="max-2-tiles"),
        pytest.param({}, dict(max_num_tiles=6, supported_aspect_ratios=[[1, 1], [2, 3], [3, 2], [1, 6]]),
                     id="max-6-tiles"),
        pytest.param({}, dict(intermediate_layers_indices=[3, 0, 2]), id="unsorted-intermediate-layers"),
    ],
)
def test_config_variants(tmp_path, text, vision):
    ref = build_reference(text, vision, seed=7, attn_implementation="sdpa")
    ours = llama_mm.load_model(write_checkpoint(tmp_path, ref))
    ratios = [tuple(r) for r in ref.config.vision_config.supported_aspect_ratios]
    for i, r in enumerate(ratios):
        compare(ref, ours, random_inputs(ref, aspect_ratios=(r,), seed=i))


@pytest.mark.parametrize("in_memory_names", [False, True], ids=["on-disk-names", "in-memory-names"])
def test_sharded_checkpoint(tmp_path, pair, in_memory_names):
    ref, _ = pair
    path = write_checkpoint(tmp_path, ref, max_shard_size="100KB", in_memory_names=in_memory_names)
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    compare(ref, llama_mm.load_model(path), random_inputs(ref, aspect_ratios=((1, 2),)))


def test_bf16_checkpoint_loaded_as_fp32(tmp_path, pair):
    from transformers import MllamaForConditionalGeneration

    ref, _ = pair
    path = write_checkpoint(tmp_path, ref, dtype=torch.bfloat16)
    ref32 = MllamaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    ours = llama_mm.load_model(path, dtype=torch.float32)
    assert ours.dtype == torch.float32
    assert llama_mm.load_model(path).dtype == torch.bfloat16  # "auto" keeps the stored dtype
    compare(ref32, ours, random_inputs(ref, aspect_ratios=((2, 2),)))


def test_bf16_vision_as_accurate_as_transformers_bf16(tmp_path, pair):
    """The vision tower and projector in bf16 (their products widened to float32 GEMMs on CPUs without bf16
    arithmetic, see ops.linear) against float32 arithmetic on the same bf16-rounded weights: at least about as close
    as transformers' own bf16 vision tower."""
    import copy

    ref, _ = pair
    ours = llama_mm.load_model(write_checkpoint(tmp_path, ref), dtype=torch.bfloat16)
    hf16 = copy.deepcopy(ref).to(torch.bfloat16)
    truth = copy.deepcopy(hf16).float()
    inputs = random_inputs(ref, aspect_ratios=((2, 2),), seed=6)
    pixels, ar_ids, ar_mask = inputs["pixel_values"], inputs["aspect_ratio_ids"], inputs["aspect_ratio_mask"]

    def hf_states(m, dtype):
        out = m.model.vision_model(pixel_values=pixels.to(dtype), aspect_ratio_ids=ar_ids,
                                   aspect_ratio_mask=ar_mask).last_hidden_state
        return m.model.multi_modal_projector(out).float().flatten(1, -2)  # (B, N * T * P, C)

    with torch.no_grad():
        exact, theirs = hf_states(truth, torch.float32), hf_states(hf16, torch.bfloat16)
        got = ours.vision_states(pixels, ar_ids, ar_mask)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    err_ours, err_theirs = (got.float() - exact).abs().max().item(), (theirs - exact).abs().max().item()
    print(f"max |vision state error| llama_mm bf16 {err_ours:.3g}, transformers bf16 {err_theirs:.3g}")
    assert err_theirs > 0 and err_ours <= 1.5 * err_theirs


def test_patch_embedding_as_a_product(pair):
    """The patch convolution as the product of unfolded patches and the weight (taken where ops.linear widens
    16-bit products): bf16 as close to float64 as at::conv2d's own bf16 convolution; float32 keeps the convolution."""
    import copy

    import torch.nn.functional as F

    _, model = pair
    vm = copy.deepcopy(model.vision_model)
    size = vm.cfg.image_size
    tiles = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(2))
    conv = vm.patch_embedding
    with torch.no_grad():
        assert torch.equal(vm.embed_patches(tiles), conv(tiles).flatten(2).transpose(1, 2))
        vm.bfloat16()
        t16 = tiles.bfloat16()
        exact = F.conv2d(t16.double(), conv.weight.double(), stride=conv.stride).flatten(2).transpose(1, 2)
        ours, theirs = vm.embed_patches(t16), conv(t16).flatten(2).transpose(1, 2)
    patches = (size // conv.stride[0]) ** 2
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape == (3, patches, vm.cfg.hidden_size)
    weight = conv.weight.reshape(conv.out_channels, -1)
    if llama_mm.ops.widens(t16, weight):  # this CPU has no bf16 arithmetic: the widened product is the path taken
        patches = F.unfold(t16, conv.kernel_size, stride=conv.stride).transpose(1, 2)
        assert torch.equal(ours, torch.ops.llama_mm.widened_linear(patches, weight))
    err, conv_err = (ours.double() - exact).abs().max().item(), (theirs.double() - exact).abs().max().item()
    print(f"patch embedding bf16: max abs error {err:.3g} (at::conv2d {conv_err:.3g})")
    assert err <= 1.5 * conv_err + 1e-6 and err <= 2 ** -7 * exact.abs().max().item()


def test_weights_are_memory_mapped_not_copied(pair):
    _, ours = pair
    p = ours.language_model.model.embed_tokens.weight
    assert not p.untyped_storage().resizable()  # a view of the file's mapping, not an owned allocation
    assert p.device.type == "cpu" and not p.requires_grad
