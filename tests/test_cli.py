"""`llama-mm` on the built-in model, as a new user meets it: the plain prompt answers correctly (truth: the spec the
image was drawn from), --stats numbers agree with the engine's own clock, adapters run from the shell, finetune is
a complete subcommand, compare checks its inputs before loading transformers, demo keeps the working dir clean."""
import json
import random
import re
import time

import pytest
import torch

import llama_mm
from llama_mm import cli, demo
from llama_mm.generator import BUILTIN_DIR

SEEDS = range(2_100_000, 2_100_004)  # fresh images (training used seeds below 1_000_000)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """(path, true caption) of a few freshly drawn images."""
    d = tmp_path_factory.mktemp("images")
    out = []
    for s in SEEDS:
        spec = demo.random_spec(random.Random(s))
        path = d / f"{s}.png"
        demo.draw(spec).save(path)
        out.append((path, demo.caption(spec)))
    return out


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_without_chat_flag_answers_correctly(drawn, capsys):
    for path, truth in drawn:
        rc, out, err = run(capsys, "generate", "--image", str(path), "--prompt", demo.PROMPT, "--temperature", "0")
        assert rc == 0 and out.strip() == truth, err
    path, truth = drawn[0]
    rc, out, _ = run(capsys, "generate", "--image", str(path), "--prompt", demo.PROMPT, "--temperature", "0",
                     "--no-chat")
    raw = llama_mm.Generator().generate(str(path), demo.PROMPT, max_new_tokens=128, temperature=0, chat=False)
    assert rc == 0 and out.strip() == raw.strip()


def test_python_api_answers_correctly_by_default(drawn):
    gen = llama_mm.Generator()
    paths, truths = [str(p) for p, _ in drawn], [t for _, t in drawn]
    assert [gen.generate(p, demo.PROMPT, temperature=0) for p in paths] == truths
    assert gen.generate(paths[0], demo.PROMPT, temperature=0, chat=True) == truths[0]
    assert "".join(gen.stream(paths[1], demo.PROMPT, temperature=0)) == truths[1]
    assert gen.generate(prompt=[demo.PROMPT] * len(paths), images=[[p] for p in paths], temperature=0) == truths


def test_stats_are_timed_where_tokens_are_produced(drawn, capsys):
    path, _ = drawn[0]
    rc, out, err = run(capsys, "generate", "--image", str(path), "--prompt", "Describe the shapes.",
                       "--temperature", "0", "--stats")
    assert rc == 0
    assert "loading weights" in err and "100%" in err  # the bar ends at its total instead of vanishing
    m = re.search(r"time to first token ([\d.]+) s \| (\d+) tokens \| decode ([\d.]+) tokens/s \(([\d.]+) ms/token\)",
                  err)
    assert m, err
    ttft, n, rate, ms = float(m[1]), int(m[2]), float(m[3]), float(m[4])
    assert n == len(llama_mm.Generator().processor.tokenizer.encode(out.strip(), add_special_tokens=False).ids) + 1
    assert ttft > 0 and rate == pytest.approx(1e3 / ms, rel=0.05)
    # the same numbers from the Python API add up to the wall time of the call
    gen = llama_mm.Generator()
    inputs = gen.request_inputs("Describe the shapes.", [str(path)])
    start = time.perf_counter()
    gen.generate_ids(inputs, 24, temperature=0)
    wall = time.perf_counter() - start
    s = gen.last_stats
    produced = s["time_to_first_token_s"] + (s["tokens"] - 1) * s["decode_s_per_token"]
    assert 0 < produced <= wall and produced > 0.8 * wall - 0.005


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on the built-in model with random B (PEFT initialises B to zero), so it changes answers."""
    from llama_mm.lora import apply_lora, save_adapter

    model = llama_mm.load_model(BUILTIN_DIR)
    torch.manual_seed(0)  # lora_A's initialisation draws from the global generator
    apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return save_adapter(model, tmp_path_factory.mktemp("adapter"))


@pytest.mark.parametrize("merge", [False, True], ids=["separate", "merged"])
def test_generate_with_adapter(drawn, adapter, capsys, merge):
    """The CLI's answer with --adapter equals Generator(adapter=...)'s on an image whose answer the adapter changes,
    so the adapter is applied."""
    def answers(gen):
        return [gen.generate(str(path), demo.PROMPT, max_new_tokens=16, temperature=0).strip() for path, _ in drawn]

    adapted, base = answers(llama_mm.Generator(adapter=adapter, merge_adapter=merge)), answers(llama_mm.Generator())
    changed = [(path, a) for (path, _), a, b in zip(drawn, adapted, base) if a != b]
    assert changed, "the adapter changes no answer"
    path, expected = changed[0]
    args = ["generate", "--image", str(path), "--prompt", demo.PROMPT, "--temperature", "0",
            "--max-new-tokens", "16", "--adapter", str(adapter)]
    rc, out, err = run(capsys, *args, *(["--merge-adapter"] if merge else []))
    assert rc == 0, err
    assert out.strip() == expected


def test_merge_adapter_needs_an_adapter(drawn, capsys):
    rc, _, err = run(capsys, "generate", "--image", str(drawn[0][0]), "--prompt", "x", "--merge-adapter")
    assert rc == 2 and "--merge-adapter needs --adapter" in err


def test_finetune_help_lists_its_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--model", "--data", "--output", "--epochs", "--lr", "--r", "--alpha", "--resume"):
        assert option in out


def test_finetune_defaults_to_the_builtin_model(drawn, tmp_path, capsys):
    rows = [{"images": [str(p)], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": demo.PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": truth}]}]} for p, truth in drawn[:2]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = run(capsys, "finetune", "--data", str(data), "--output", str(tmp_path / "out"),
                       "--max-steps", "1", "--no-progress", "--device", "cpu")
    assert rc == 0, err
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(BUILTIN_DIR)


def test_compare_checks_the_image_before_loading_transformers(monkeypatch, tmp_path, capsys):
    import transformers

    def refuse(*a, **k):
        raise AssertionError("transformers was loaded before the inputs were checked")

    monkeypatch.setattr(transformers.MllamaForConditionalGeneration, "from_pretrained", refuse)
    missing = tmp_path / "nope.png"
    for command in ("compare", "generate"):
        extra = ["--backend", "transformers"] if command == "generate" else []
        rc, _, err = run(capsys, command, "--image", str(missing), "--prompt", "x", *extra)
        assert rc == 2 and str(missing) in err and "no such file" in err


def test_demo_writes_its_image_outside_the_working_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(capsys, "demo", "--seed", "5")
    assert rc == 0 and list(tmp_path.iterdir()) == []
    image = re.search(r"image:  (.+)\n", out)[1]
    from PIL import Image

    with Image.open(image) as im:
        assert im.size == (demo.IMAGE_SIZE, demo.IMAGE_SIZE)
    truth = demo.caption(demo.random_spec(random.Random(5)))
    assert f"truth:  {truth}\n" in out
