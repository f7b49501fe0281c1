"""The training loop on tiny random checkpoints: the loss against transformers' (the oracle), accumulation against a
larger batch, exact resumption, gradient checkpointing against none, autocast, and bad data reported by line."""
import json

import pytest
import torch
from PIL import Image

import llama_mm
from checkpoints import build_reference, random_inputs, write_checkpoint
from llama_mm.lora import lora_layers
from llama_mm.train import IGNORE, TrainConfig, accumulate_gradients, collate, masked_lm_loss, read_jsonl, train
from safetensors.torch import load_file
from test_model import rel_diff


@pytest.fixture(scope="module")
def ref():
    return build_reference(seed=21)


@pytest.fixture(scope="module")
def base_dir(ref, tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("base"), ref)


def make_rows(ref, n, seed=0, lengths=(10, 13, 11, 14), ratios=((1, 1), (2, 1), (1, 2))):
    """Rows as ChatDataset yields them: one image each, labels on the second half (the 'assistant reply')."""
    rows = []
    for i in range(n):
        L = lengths[i % len(lengths)]
        row = random_inputs(ref, seq=L, seed=seed + i, aspect_ratios=(ratios[i % len(ratios)],))
        labels = row["input_ids"].clone()
        labels[:, : L // 2] = IGNORE
        rows.append(dict(row, labels=labels))
    return rows


def config(**kw):
    return TrainConfig(**dict(dict(r=4, alpha=8, dropout=0.0, lr=1e-2, progress=False, log_every=1,
                                   target_modules=("q_proj", "v_proj", "o_proj", "down_proj", "fc1",
                                                   "multi_modal_projector")), **kw))


def adapter(directory):
    return load_file(directory / "adapter_model.safetensors")


def test_loss_matches_transformers(ref, base_dir):
    """Summed masked token loss / token count = transformers' causal-LM loss, on a right-padded batch."""
    batch = collate(make_rows(ref, 2), pad_id=0)
    assert batch["input_ids"].shape == (2, 13) and (batch["labels"][0, 10:] == IGNORE).all()
    model = llama_mm.load_model(base_dir)
    with torch.no_grad():
        loss_sum, n = masked_lm_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                                     batch["labels"])
        want = ref(**batch).loss
    assert n == int((batch["labels"][:, 1:] != IGNORE).sum()) > 0
    print(f"loss {loss_sum.item() / n:.6f} vs transformers {want.item():.6f}")
    assert abs(loss_sum.item() / n - want.item()) < 1e-5 * want.item()


def test_collate_pads_text_and_images(ref):
    rows = make_rows(ref, 2, lengths=(9, 12))
    rows[1] = random_inputs(ref, seq=12, seed=5, images_per_row=2, aspect_ratios=((1, 1), (2, 2)))
    rows[1]["labels"] = rows[1]["input_ids"].clone()
    text_only = {k: v for k, v in make_rows(ref, 1, lengths=(7,))[0].items() if k in ("input_ids", "attention_mask",
                                                                                      "labels")}
    b = collate([*rows, text_only], pad_id=5)
    assert b["input_ids"].shape == (3, 12) and b["pixel_values"].shape[:3] == (3, 2, 4)
    assert (b["input_ids"][0, 9:] == 5).all() and (b["attention_mask"][0, 9:] == 0).all()
    assert (b["labels"][2, 7:] == IGNORE).all() and (b["cross_attention_mask"][2] == 0).all()
    assert (b["cross_attention_mask"][0, :, 1] == 0).all() and (b["aspect_ratio_mask"][0, 1] == 0).all()
    assert torch.equal(b["pixel_values"][1], rows[1]["pixel_values"][0])


def test_accumulation_equals_larger_batch(ref, base_dir, tmp_path):
    """Two micro-batches of one row give the gradient of one batch of two (the loss is normalised by the step's
    token count, not per micro-batch)."""
    rows = make_rows(ref, 2)
    grads = []
    for batches in ([collate(rows, 0)], [collate(rows[:1], 0), collate(rows[1:], 0)]):
        model = llama_mm.load_model(base_dir)
        train(model, rows, tmp_path / str(len(batches)), config(max_steps=1))  # a trained (non-zero) adapter
        model.zero_grad()
        loss, _ = accumulate_gradients(model, batches)
        grads.append((loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_big, big), (loss_acc, acc) = grads
    assert big.keys() == acc.keys() and len(big) == 2 * len(lora_layers(model))
    assert abs(loss_big - loss_acc) < 1e-6 * loss_big
    for k in big:
        assert rel_diff(big[k], acc[k]) < 1e-5, k


class Interrupted(Exception):
    pass


class CrashAfter(list):
    """A dataset that dies (like a killed process) once `limit` rows have been fetched."""

    def __init__(self, rows, limit):
        super().__init__(rows)
        self.fetched, self.limit = 0, limit

    def __getitem__(self, i):
        self.fetched += 1
        if self.fetched > self.limit:
            raise Interrupted
        return super().__getitem__(i)


def test_resume_is_exact(ref, base_dir, tmp_path):
    """6 steps straight vs 3 steps, a crash, resume, 3 more: identical adapters. Shuffled order crossing an epoch,
    dropout (RNG state), warm-up and decay (scheduler), AdamW moments all have to be restored."""
    rows = make_rows(ref, 7)  # 4 steps per epoch: the checkpoint is mid-epoch, step 6 in the second epoch
    cfg = config(batch_size=1, grad_accum=2, epochs=3, max_steps=6, save_every=3, dropout=0.2, warmup_steps=2)
    straight = tmp_path / "straight"
    train(llama_mm.load_model(base_dir), rows, straight, cfg)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        train(llama_mm.load_model(base_dir), CrashAfter(rows, limit=7), out, cfg)  # dies in step 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3"]
    result = train(llama_mm.load_model(base_dir), rows, out, cfg, resume=True)
    assert result.steps == 6

    want, got, mid = adapter(straight), adapter(out), adapter(out / "checkpoint-3")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert any(not torch.equal(want[k], mid[k]) for k in want)  # steps 4-6 did change the adapter
    assert json.loads((straight / "checkpoint-6" / "trainer_state.json").read_text())["epoch"] == 1


def test_resume_refuses_a_different_config(ref, base_dir, tmp_path):
    rows = make_rows(ref, 2)
    train(llama_mm.load_model(base_dir), rows, tmp_path, config(max_steps=1))
    with pytest.raises(ValueError, match=r"different configuration: lr: checkpoint 0.01 vs now 0.02"):
        train(llama_mm.load_model(base_dir), rows, tmp_path, config(max_steps=1, lr=2e-2), resume=True)
    with pytest.raises(ValueError, match="no checkpoint-N directory"):
        train(llama_mm.load_model(base_dir), rows, tmp_path / "empty", config(), resume=True)


def test_gradient_checkpointing_recomputes_and_matches(ref, base_dir, tmp_path):
    rows = make_rows(ref, 2)
    counts = {}

    def run(name, checkpointing):
        model = llama_mm.load_model(base_dir)
        counts[name] = 0
        for layer in (model.language_model.model.layers[0], model.vision_model.transformer.layers[0]):
            layer.mlp.register_forward_pre_hook(lambda *_: counts.__setitem__(name, counts[name] + 1))
        train(model, rows, tmp_path / name, config(max_steps=2, dropout=0.1, gradient_checkpointing=checkpointing))
        return adapter(tmp_path / name)

    plain, ckpt = run("plain", False), run("ckpt", True)
    assert counts == {"plain": 4, "ckpt": 8}  # 2 steps x 2 layers, each recomputed during backward
    for k in plain:
        assert torch.equal(plain[k], ckpt[k]), k


@pytest.mark.parametrize("mode,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast(ref, base_dir, tmp_path, mode, dtype):
    rows = make_rows(ref, 2)
    full = train(llama_mm.load_model(base_dir), rows, tmp_path / "fp32", config(max_steps=2))
    model = llama_mm.load_model(base_dir)
    seen = set()
    model.language_model.model.layers[0].mlp.register_forward_hook(  # (the Linears are replaced by LoRA ones)
        lambda m, i, o: seen.add(o.dtype))
    low = train(model, rows, tmp_path / mode, config(max_steps=2, autocast=mode))
    assert seen == {dtype}
    assert all(p.dtype == torch.float32 for layer in lora_layers(model).values()
               for p in (layer.lora_A.weight, layer.lora_B.weight))
    for a, b in zip(full.history, low.history):
        assert abs(a["loss"] - b["loss"]) < 0.05 * a["loss"]


def test_bf16_base_weights(ref, base_dir, tmp_path):
    rows = make_rows(ref, 2)
    model = llama_mm.load_model(base_dir, dtype="bfloat16")
    result = train(model, rows, tmp_path, config(max_steps=2))
    assert model.dtype == torch.bfloat16 and torch.isfinite(torch.tensor(result.history[-1]["loss"]))
    assert all(t.dtype == torch.float32 for t in adapter(tmp_path).values())


def test_training_learns(ref, base_dir, tmp_path):
    rows = make_rows(ref, 2)
    result = train(llama_mm.load_model(base_dir), rows, tmp_path, config(epochs=25, batch_size=2, lr=2e-2))
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    print(f"loss {first:.3f} -> {last:.3f}")
    assert last < 0.3 * first
    model = llama_mm.lora.load_adapter(llama_mm.load_model(base_dir), tmp_path)  # the saved adapter is the trained one
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        loss, n = masked_lm_loss(model(**{k: v for k, v in batch.items() if k != "labels"}).logits, batch["labels"])
    assert loss.item() / n < 0.5 * first


# ------------------------------------------------------------------------------------------ bad data, by line number
def write_png(path, color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), color).save(path)


def chat(n_images=1, reply="a red square"):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": "what?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": reply}]}]


def test_bad_rows_are_reported_by_line(tmp_path):
    write_png(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    good = {"images": ["img/a.png"], "messages": chat()}
    lines = [
        json.dumps(good),                                                           # 1 ok
        json.dumps({"images": ["img/missing.png"], "messages": chat()}),            # 2 missing image
        '{"images": ["img/a.png"], "messages": [',                                  # 3 malformed JSON
        "",                                                                         # 4 blank: skipped
        json.dumps({"images": ["img/a.png"], "messages": [{"role": "bot", "content": "hi"}]}),      # 5 bad role
        json.dumps({"images": [], "messages": chat()}),                             # 6 image count mismatch
        json.dumps({"images": ["img/a.png"], "messages": chat()[:1]}),              # 7 no assistant turn
        json.dumps({"images": ["img/a.png"], "messages": [chat()[0], {"role": "assistant", "content": [
            {"type": "image"}]}]}),                                                 # 8 image in a reply
        json.dumps({"images": ["img/broken.png"], "messages": chat()}),             # 9 unreadable image
        json.dumps({"images": ["img/a.png"], "messages": [chat()[0], {"role": "assistant", "content": [
            {"type": "txt", "text": "x"}]}]}),                                      # 10 bad part
        json.dumps(["not", "an", "object"]),                                        # 11
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError) as e:
        read_jsonl(data)
    msg = str(e.value)
    print(msg)
    assert "9 bad row(s)" in msg and "line 1:" not in msg and "line 4:" not in msg
    for fragment in ["line 2: image", "missing.png' not found", "line 3: malformed JSON",
                     "line 5: messages[0] must be an object with 'role'",
                     "line 6: 1 image part(s) in the messages but 0",
                     "line 7: no assistant message", "line 8: messages[1].content[0]: assistant messages cannot hold",
                     "line 9: image", "broken.png' cannot be read", "line 10: messages[1].content[0]: a part must be",
                     "line 11: a row must be a JSON object"]:
        assert fragment in msg, fragment
    data.write_text(lines[0] + "\n")
    (ex,) = read_jsonl(data)
    assert ex.line == 1 and ex.images == [tmp_path / "img" / "a.png"]


def test_config_is_checked():
    with pytest.raises(ValueError, match="grad_accum must be an integer >= 1"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="autocast must be one of"):
        TrainConfig(autocast="int8")


# ------------------------------------------------------------------------------------------ end to end, from JSONL
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def chat_model_dir(ref, tmp_path_factory):
    """The tiny checkpoint plus Llama-3.2-Vision-style tokenizer files (28-pixel tiles, as the tiny vision tower)."""
    from tokenizer_fixture import write_tokenizer_files

    directory = write_checkpoint(tmp_path_factory.mktemp("chat"), ref)
    write_tokenizer_files(directory, vocab_size=ref.config.text_config.vocab_size)
    pre = json.loads((directory / "preprocessor_config.json").read_text())
    size = ref.config.vision_config.image_size
    (directory / "preprocessor_config.json").write_text(json.dumps(dict(pre, size={"height": size, "width": size})))
    return directory


def colour_data(directory, n=6):
    """JSONL of 'what colour is this?' rows; row 1 is a two-turn chat whose image comes in the second turn."""
    rows = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        write_png(directory / "img" / f"{i}.png", COLOURS[name])
        rows.append({"images": [f"img/{i}.png"], "messages": chat(reply=name)})
    write_png(directory / "img" / "wide.png", COLOURS["blue"])
    rows[1] = {"images": ["img/wide.png"], "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]},
        {"role": "assistant", "content": "blue"}]}
    path = directory / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labels_are_the_assistant_replies(chat_model_dir, tmp_path):
    from llama_mm.processor import MllamaProcessor
    from llama_mm.train import ChatDataset

    processor = MllamaProcessor.from_pretrained(chat_model_dir)
    dataset = ChatDataset(colour_data(tmp_path), processor)
    for i, want in [(0, "red<|eot_id|>"), (1, "hi there<|eot_id|>blue<|eot_id|>"), (2, "blue<|eot_id|>")]:
        row = dataset[i]
        text = processor.apply_chat_template(dataset.examples[i].messages, add_generation_prompt=False)
        image = Image.open(dataset.examples[i].images[0])
        assert torch.equal(row["input_ids"], processor(images=[[image]], text=[text])["input_ids"])
        labelled = row["labels"][0] != IGNORE
        assert torch.equal(row["labels"][0][labelled], row["input_ids"][0][labelled])
        assert processor.decode(row["labels"][0][labelled], skip_special_tokens=False) == want
        assert set(row) == {"input_ids", "attention_mask", "labels", "pixel_values", "aspect_ratio_ids",
                            "aspect_ratio_mask", "cross_attention_mask"}


@pytest.mark.parametrize("trim_offsets", [False, True])
def test_label_tokens_against_prefix_tokenisation(chat_model_dir, trim_offsets):
    """Labels from offsets = labels from tokenising the text up to each span boundary (an independent count),
    including replies that start with a space and hold whitespace-only tokens, with offsets trimmed or not."""
    from tokenizers import Tokenizer, processors

    from llama_mm.train import label_tokens

    tok = Tokenizer.from_file(str(chat_model_dir / "tokenizer.json"))
    tok.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    head = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    parts = ["<|begin_of_text|>" + head, " a red  one\n\n  two<|eot_id|>", "<|start_header_id|>user<|end_header_id|>"
             "\n\n ok<|eot_id|>" + head, "three <|eot_id|>"]
    text = "".join(parts)
    bounds = [sum(len(p) for p in parts[:i]) for i in range(len(parts) + 1)]
    spans = [(bounds[1], bounds[2]), (bounds[3], bounds[4])]
    ids, labels = label_tokens(tok, text, spans)
    count = [len(tok.encode(text[:b], add_special_tokens=False).ids) for b in bounds]
    assert count[-1] == len(ids)  # every boundary falls between tokens here
    want = [t if count[1] <= i < count[2] or count[3] <= i < count[4] else IGNORE for i, t in enumerate(ids)]
    assert labels == want and sum(lab != IGNORE for lab in labels) > 8


def test_label_tokens_with_trimmed_empty_tokens():
    """Hand-made offsets as a trimming tokenizer reports them: whitespace tokens are empty at their end."""
    from types import SimpleNamespace

    from llama_mm.train import label_tokens

    # text "H:  ab c" with the reply span [4, 8) = "ab c"; tokens: "H", ":", "  " (empty at 4), "ab", " " (empty at
    # 7), "c"
    offsets = [(0, 1), (1, 2), (4, 4), (4, 6), (7, 7), (7, 8)]
    tok = SimpleNamespace(encode=lambda text, add_special_tokens: SimpleNamespace(ids=[10, 11, 12, 13, 14, 15],
                                                                               offsets=offsets))
    assert label_tokens(tok, "H:  ab c", [(4, 8)])[1] == [IGNORE, IGNORE, IGNORE, 13, 14, 15]


def test_finetune_from_jsonl(chat_model_dir, tmp_path):
    from llama_mm.train import finetune

    data = colour_data(tmp_path)
    result = finetune(chat_model_dir, data, tmp_path / "out", epochs=8, lr=1e-2, batch_size=2, grad_accum=2, r=4,
                      alpha=8, dropout=0.0, progress=False, log_every=1, save_every=4, device="cpu")
    assert result.steps == 16 and (tmp_path / "out" / "checkpoint-4").is_dir()
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    print(f"loss {first:.3f} -> {last:.3f}, {result.history[-1]['tokens_per_s']:.0f} tokens/s")
    assert last < 0.5 * first
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(chat_model_dir)
    model = llama_mm.lora.load_adapter(llama_mm.load_model(chat_model_dir), tmp_path / "out")
    assert len(lora_layers(model)) > 0


def test_finetune_cli_arguments(chat_model_dir, tmp_path, capsys):
    from llama_mm.cli import main

    data = colour_data(tmp_path, n=3)
    args = ["finetune", "--model", str(chat_model_dir), "--data", str(data), "--output", str(tmp_path / "out"),
            "--max-steps", "2", "--r", "2", "--target-modules", "q_proj,fc1", "--autocast", "bf16",
            "--gradient-checkpointing", "--no-progress", "--device", "cpu"]
    assert main(args) == 0
    assert "after 2 steps" in capsys.readouterr().out
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["fc1", "q_proj"]
    state = json.loads((tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["config"]["autocast"] == "bf16" and state["config"]["gradient_checkpointing"]

    data.write_text(data.read_text() + "{oops\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "llama-mm finetune: error:" in err and "line 4: malformed JSON" in err


def test_finetune_reports_bad_rows_before_loading(chat_model_dir, tmp_path):
    from llama_mm.train import finetune

    data = colour_data(tmp_path, n=3)
    rows = data.read_text().splitlines()
    rows[2] = rows[2].replace("img/2.png", "img/nope.png")
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"line 3: image .*nope.png' not found"):
        finetune(chat_model_dir, data, tmp_path / "out", progress=False)
    rows[2] = json.dumps({"images": ["img/0.png"], "messages": chat(reply="red " * 600)})  # > 512 positions
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=r"line 3: \d+ tokens, longer than the model's context of 512"):
        finetune(chat_model_dir, data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
