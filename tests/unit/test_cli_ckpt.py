"""`liveavatar check-ckpt` and `liveavatar inspect`.

A complete tiny checkpoint (official layout and formats, `--preset tiny`) passes with exit 0; copies
broken in one way each (missing shard, truncated shard, misshapen tensor, foreign LoRA key, truncated
`.pth`) fail with exit 1 and name the problem. User errors print one `error:` line with exit 2.
`inspect --preset s2v-14b --json` reports the real DiT size. One run goes through `python -m liveavatar`.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from liveavatar.cli import main
from liveavatar.config import TINY
from liveavatar.io import checkpoint as ck
from liveavatar.io.ckpt_writer import write_random_checkpoint
from liveavatar.io.verify import inspect_preset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    lora = base / "LiveAvatar" / ck.LORA_FILE
    write_random_checkpoint(base / "Wan2.2-S2V-14B", TINY, seed=1, num_shards=3, lora_path=lora)
    return base / "Wan2.2-S2V-14B", lora


@pytest.fixture
def broken(ckpt, tmp_path):
    """A private copy of the checkpoint and LoRA to damage."""
    root, lora = ckpt
    shutil.copytree(root, tmp_path / "ck")
    shutil.copy(lora, tmp_path / ck.LORA_FILE)
    return tmp_path / "ck", tmp_path / ck.LORA_FILE


def _check(capsys, root, lora, *extra):
    code = main(["check-ckpt", "--ckpt_dir", str(root), "--lora_path", str(lora), "--preset", "tiny", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_complete_checkpoint_passes(ckpt, capsys):
    code, out, err = _check(capsys, *ckpt)
    assert code == 0 and err == ""
    for name in ck.COMPONENTS:
        assert any(line.startswith(f"{name} ") and " ok " in line for line in out.splitlines()), name
    assert "all checked components are complete" in out
    assert len(out.splitlines()) <= 24  # one screen


def test_only_checks_the_named_components(ckpt, capsys):
    code, out, _ = _check(capsys, *ckpt, "--only", "t5,dit")
    lines = out.splitlines()
    assert code == 0 and [ln.split()[0] for ln in lines[2:4]] == ["dit", "t5"] and "vae " not in out


def test_missing_shard_fails(broken, capsys):
    root, lora = broken
    (root / ck.dit_shard_name(2, 3)).unlink()
    code, out, _ = _check(capsys, root, lora)
    assert code == 1
    assert "dit: missing shard diffusion_pytorch_model-00002-of-00003.safetensors" in out
    assert "t5 " in out and "FAILED" in out


def test_truncated_shard_fails(broken, capsys):
    root, lora = broken
    shard = root / ck.dit_shard_name(3, 3)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    code, out, _ = _check(capsys, root, lora)
    assert code == 1 and f"{shard} is truncated" in out


def test_misshapen_tensor_fails(broken, capsys):
    root, lora = broken
    shard = root / ck.dit_shard_name(1, 3)
    sd = load_file(shard)
    sd["patch_embedding.bias"] = torch.zeros(TINY.dit.dim + 1, dtype=torch.bfloat16)
    save_file(sd, str(shard))
    code, out, _ = _check(capsys, root, lora)
    d = TINY.dit.dim
    assert code == 1 and f"tensor patch_embedding.bias has shape [{d + 1}], expected [{d}]" in out


def test_foreign_lora_key_fails(broken, capsys):
    root, lora = broken
    sd = load_file(lora)
    d = TINY.dit.dim
    sd["base_model.model.blocks.0.norm3.lora_A.default.weight"] = torch.zeros(4, d, dtype=torch.bfloat16)
    sd["blocks.0.self_attn.q.weight"] = torch.zeros(d, d, dtype=torch.bfloat16)
    save_file(sd, str(lora))
    code, out, _ = _check(capsys, root, lora)
    assert code == 1
    assert "lora: LoRA tensor base_model.model.blocks.0.norm3.lora_A.default.weight matches no target" in out
    assert "lora: tensor blocks.0.self_attn.q.weight is not a peft LoRA weight" in out
    assert [ln for ln in out.splitlines() if ln.startswith("dit ")][0].split()[1] == "ok"


def test_truncated_pth_and_missing_tensor_fail(broken, capsys):
    root, lora = broken
    data = (root / ck.VAE_FILE).read_bytes()
    (root / ck.VAE_FILE).write_bytes(data[: len(data) // 3])
    t5 = torch.load(root / ck.T5_FILE, weights_only=True)
    del t5["blocks.1.norm2.weight"]
    torch.save(t5, root / ck.T5_FILE)
    code, out, _ = _check(capsys, root, lora)
    assert code == 1
    assert f"vae: {root / ck.VAE_FILE} cannot be opened as a torch checkpoint" in out
    assert "t5: missing tensor blocks.1.norm2.weight" in out


def test_wrong_preset_is_explained_not_flooded(ckpt, capsys):
    root, _ = ckpt
    code = main(["check-ckpt", "--ckpt_dir", str(root), "--preset", "s2v-14b"])
    out = capsys.readouterr().out
    assert code == 1 and "config.json does not match the preset: dim=64 (preset: 5120)" in out
    assert "note: dit: tensors not compared" in out and "dit: missing tensor" not in out
    assert "t5: ... and 222 more (all: --all_problems)" in out and len(out.splitlines()) < 100
    code = main(["check-ckpt", "--ckpt_dir", str(root), "--only", "t5", "--all_problems"])
    out = capsys.readouterr().out
    assert code == 1 and "t5: missing tensor blocks.23.pos_embedding.embedding.weight" in out
    assert "more" not in out


def test_user_errors_print_one_line(tmp_path, capsys):
    code = main(["check-ckpt", "--ckpt_dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: checkpoint folder") and err.count("\n") == 1
    code = main(["check-ckpt", "--ckpt_dir", str(tmp_path), "--only", "dit,vea"])
    assert code == 2 and "unknown component(s) vea" in capsys.readouterr().err


def test_inspect_json_reports_the_real_dit(capsys):
    assert main(["inspect", "--preset", "s2v-14b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    comps = {c["name"]: c for c in data["components"]}
    assert (comps["dit"]["params"], comps["dit"]["tensors"]) == (16_295_755_609, 1260)
    assert comps["dit"]["bytes_per_dtype"] == {"bfloat16": 32_591_511_218, "float32": 65_183_022_436}
    assert comps["t5"]["params"] == 5_680_910_336 and comps["lora"]["tensors"] == 896
    assert main(["inspect", "--preset", "tiny"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[2].split()[:3] == ["dit", "180", f"{inspect_preset('tiny')[0].params:,}"]


def test_python_m_liveavatar(ckpt):
    root, lora = ckpt
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "liveavatar", "check-ckpt", "--preset", "tiny"]
    run = dict(capture_output=True, text=True, cwd=ROOT, env=env)
    ok = subprocess.run([*cmd, "--ckpt_dir", str(root), "--lora_path", str(lora)], **run)
    assert ok.returncode == 0 and "all checked components are complete" in ok.stdout, ok.stderr
    bad = subprocess.run([*cmd, "--ckpt_dir", str(root / "nope")], **run)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
