"""`liveavatar plan`: the GPU sizes of docs/memory.md's scenarios with `--auto --json`, `--no_fp8`,
setups nothing fits, an explicit configuration that does not fit, and malformed `--gpus`.

What is checked beyond the exit code: the budget is the documented rule (95 % of the memory less a
0.6 GiB CUDA context), the predicted peak is within it and is explained by the printed components, the
KV components agree with the printed flags and with the cache sizes of architecture.md §10.2, and the
printed flags parse through `generate`'s parser into the same runtime configuration (and, for the
"what fits" hint, plan back to exit 0). The 14B model is built on meta once per process (cached).
"""

import json
import shlex

import pytest

from liveavatar.cli import build_parser, main

GiB = 2**30
SINK = 40 * 2640 * 2 * 5120 * 2  # sink at 704x384: 1056 ref + 1056 + 264 + 264 motion tokens
# One step's ring at 704x384: 40 layers, 12 frames of fs 1056, K+V bf16, followed in each layer's buffer by
# the 2640 sink tokens (re-roped there once per forward).
RING = 40 * (12 * 1056 + 2640) * 2 * 5120 * 2
RING_SHARED = 40 * 12 * 1056 * 2 * 5120 * 2  # --kv_sink shared: the ring tokens only
STAGING = (12 * 1056 + 2640) * 2 * 5120 * 2  # one layer of ring + sink, shared by the staged rings (FP8, shared)
RING_FP8 = 40 * 12 * 1056 * 2 * 5120 + 40 * 12 * 1056 * 2 * 40 * 4  # FP8 K+V plus one fp32 scale per token/head
HOST_SLOTS = 2 * RING // 40  # a host-staged ring keeps two layers (ring + sink) on the GPU
TRANSIENT = ("dit.workspace", "vae.decode_workspace", "audio_encoder.windowed")  # never alive at once
NOT_RESIDENT = ("setup.encoders", "cuda_context")


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def plan_json(capsys, *argv: str) -> tuple[int, dict]:
    rc, out, err = run_plan(capsys, *argv, "--json")
    assert err == ""
    return rc, json.loads(out)


def budget(gib: float) -> int:
    return int(gib * GiB * 0.95) - int(0.6 * GiB)


def generate_args(flags: list[str]):
    return build_parser().parse_args(["generate", *flags])


def check_flags_round_trip(p: dict) -> None:
    """The printed flags give `generate` the configuration the plan describes."""
    ns = generate_args(p["flags"])
    cfg = p["config"]
    assert (ns.fp8, ns.resident_blocks, ns.kv_on_device, ns.kv_fp8, ns.t5_cpu, ns.offload_model) == (
        cfg["fp8"], cfg["resident_blocks"], cfg["kv_on_device"], cfg["kv_fp8"], cfg["t5_cpu"], cfg["offload_model"])
    # per_ring is printed as the default (auto gives per_ring wherever per_ring fits, as a fitting plan does)
    assert ns.kv_sink == ("shared" if cfg["kv_sink"] == "shared" else "auto")


def check_components(g: dict, cfg: dict) -> None:
    """The peak is max(setup, steady) of the printed components, and the KV lines match the flags."""
    c = g["components"]
    steady = sum(v for k, v in c.items() if k not in TRANSIENT + NOT_RESIDENT) + max(c[k] for k in TRANSIENT)
    assert g["steady_bytes"] == steady
    assert g["peak_bytes"] == max(g["steady_bytes"], g["setup_bytes"])
    on_device = 4 if cfg["kv_on_device"] is None else cfg["kv_on_device"]
    shared = cfg["kv_sink"] == "shared"
    assert c["kv.ring_caches"] == on_device * (RING_FP8 if cfg["kv_fp8"] else RING_SHARED if shared else RING)
    assert c["kv.staging"] == (STAGING if on_device and (cfg["kv_fp8"] or shared) else 0)
    assert c["kv.host_ring_slots"] == (4 - on_device) * HOST_SLOTS
    assert c["kv.sink"] == SINK
    assert (c["dit.stream_slots"] > 0) == (cfg["resident_blocks"] is not None and cfg["resident_blocks"] < 40)


SCENARIOS = [  # (argv, number of GPUs, GiB each); several GPUs: test_plan_parallel.py
    (["--gpu_memory", "24"], 1, 24),
    (["--gpu_memory", "48"], 1, 48),
    (["--gpu_memory", "80"], 1, 80),
    (["--gpus", "1x24"], 1, 24),
]


@pytest.mark.parametrize("argv,n_gpus,gib", SCENARIOS, ids=[" ".join(s[0]) for s in SCENARIOS])
def test_auto_fits_each_scenario_gpu(capsys, argv, n_gpus, gib):
    rc, p = plan_json(capsys, *argv, "--auto")
    assert rc == 0 and p["fits"] is True and p["note"] == ""
    assert (p["config"]["height"], p["config"]["width"], p["config"]["infer_frames"]) == (704, 384, 48)
    assert p["budget_bytes"] == budget(gib)
    g = p["gpus"][0]
    assert 0 < g["peak_bytes"] <= p["budget_bytes"]
    check_components(g, p["config"])
    check_flags_round_trip(p)
    assert p["seconds_per_block_estimate"] > 0
    assert len(p["gpus"]) == n_gpus


def test_auto_picks_fp8_and_staged_kv_on_24_gb(capsys):
    """On 24 GiB nothing with all four ring caches on the GPU fits, so some rings are host-staged (how many
    against how many streamed blocks is the speed model's trade-off of compute against the host link)."""
    _, p = plan_json(capsys, "--gpu_memory", "24", "--auto")
    assert p["config"]["fp8"] is True and p["config"]["kv_on_device"] < 4
    assert p["gpu"]["name"] == "unspecified GPU" and p["gpu"]["known"] is False
    rc, q = plan_json(capsys, "--gpu_memory", "24", "--fp8")  # the same, but the rings left on the GPU
    assert rc == 1 and q["fits"] is False and q["gpus"][0]["peak_bytes"] > q["budget_bytes"]


def test_more_memory_is_never_slower(capsys):
    """The fastest fitting layout of a bigger GPU (same rates: an H100's, whose compute is fast enough for
    the host link to matter) is at least as fast."""
    times = []
    for gib in (16, 24, 32, 48, 64):
        _, p = plan_json(capsys, "--gpu", "h100-sxm", "--gpu_memory", str(gib), "--auto", "--link_gbps", "25")
        assert p["fits"]
        times.append(p["seconds_per_block_estimate"])
    assert times == sorted(times, reverse=True)
    assert times[0] > times[-1]


@pytest.mark.parametrize("gib", [24, 48, 80])
def test_no_fp8_never_picks_fp8(capsys, gib):
    rc, p = plan_json(capsys, "--gpu_memory", str(gib), "--auto", "--no_fp8")
    assert rc == 0 and p["fits"] is True
    assert p["config"]["fp8"] is False and p["config"]["kv_fp8"] is False and "--fp8" not in p["flags"]
    assert p["gpus"][0]["peak_bytes"] <= p["budget_bytes"]
    check_components(p["gpus"][0], p["config"])
    check_flags_round_trip(p)
    # bf16 with every block and every ring (each with its sink tokens) on the GPU needs 81.7 GiB at 704x384:
    # 80 GiB keeps every block and hosts one ring (its layers arrive while the layer before computes)
    if gib == 80:
        assert p["config"]["resident_blocks"] is None and p["config"]["kv_on_device"] == 3
    else:
        assert p["config"]["kv_on_device"] == 0


def test_a100_80gb_bf16_keeps_every_block_resident(capsys):
    """bf16 at 704x384 with every block and ring resident needs 81.7 GiB with a copy of the sink in each
    ring, 73.9 GiB with the sink shared (stored once, each layer's ring + sink staged per forward): only
    the latter fits an 80 GB A100. Streaming blocks instead is slower: on a 25 GB/s link a block's
    weights take longer to arrive than a layer computes. The pick keeps every block resident and is at
    least as fast as the shared sink (here a host-staged ring, whose layers arrive in time); on a slower
    link that ring would stall, and the shared sink is the pick."""
    base = ["--gpu", "a100-80gb", "--no_fp8"]
    rc, per_ring = plan_json(capsys, *base, "--kv_sink", "per_ring")
    assert rc == 1 and not per_ring["fits"] and per_ring["gpus"][0]["peak_bytes"] > 81.6 * GiB
    rc, shared = plan_json(capsys, *base, "--kv_sink", "shared")
    assert rc == 0 and shared["fits"] and shared["gpus"][0]["peak_bytes"] < 74 * GiB
    assert per_ring["gpus"][0]["peak_bytes"] - shared["gpus"][0]["peak_bytes"] == 4 * SINK - STAGING
    rc, streamed = plan_json(capsys, *base, "--resident_blocks", "28")  # per_ring, the blocks that fit
    assert rc == 0 and streamed["fits"]
    assert shared["seconds_per_block_estimate"] < streamed["seconds_per_block_estimate"]
    assert per_ring["seconds_per_block_estimate"] < shared["seconds_per_block_estimate"]  # staging costs a little
    rc, auto = plan_json(capsys, *base, "--auto")
    assert rc == 0 and auto["fits"] and auto["config"]["resident_blocks"] is None
    assert auto["seconds_per_block_estimate"] <= shared["seconds_per_block_estimate"]
    rc, slow = plan_json(capsys, *base, "--auto", "--link_gbps", "12")
    assert rc == 0 and slow["fits"] and "--kv_sink shared" in " ".join(slow["flags"])
    assert slow["config"]["resident_blocks"] is None and slow["config"]["kv_on_device"] is None
    for p in (shared, auto, slow):
        check_components(p["gpus"][0], p["config"])
        check_flags_round_trip(p)


@pytest.mark.parametrize("argv", [["--gpu_memory", "6"], ["--gpu_memory", "24", "--size", "2048*2048"]])
def test_nothing_fits_exits_1_and_names_the_way_out(capsys, argv):
    rc, p = plan_json(capsys, *argv, "--auto")
    assert rc == 1 and p["fits"] is False
    assert p["gpus"][0]["peak_bytes"] > p["budget_bytes"]
    assert "nothing fits" in p["note"] and "smaller --size" in p["note"] and "more memory" in p["note"]
    if "--size" in argv:
        h, w = p["config"]["height"], p["config"]["width"]
        assert 704 * 384 < h * w <= 2048 * 2048 and h > w  # portrait 16:9 default aspect
    # The text form says the same on stdout.
    rc, out, _ = run_plan(capsys, *argv, "--auto")
    assert rc == 1 and "does NOT fit" in out and "nothing fits" in out


def test_explicit_config_that_does_not_fit_prints_what_fits(capsys):
    rc, out, err = run_plan(capsys, "--gpu_memory", "24")
    assert rc == 1 and err == ""
    assert "does NOT fit" in out
    hint = [line for line in out.splitlines() if line.startswith("what fits: liveavatar generate ")]
    assert len(hint) == 1
    flags = shlex.split(hint[0].removeprefix("what fits: liveavatar generate "))
    generate_args(flags)  # parses as generate flags
    assert flags[-2:] == ["--size", "704*384"]
    rc, out, _ = run_plan(capsys, "--gpu_memory", "24", *flags)  # the hint itself fits
    assert rc == 0 and "does NOT fit" not in out and "run: liveavatar generate " in out


def test_explicit_config_that_fits_prints_the_command(capsys):
    rc, out, _ = run_plan(capsys, "--gpus", "1x96")
    assert rc == 0
    run = [line for line in out.splitlines() if line.startswith("run: liveavatar generate ")]
    assert len(run) == 1
    ns = generate_args(shlex.split(run[0].removeprefix("run: liveavatar generate ")))
    assert ns.gpu_memory == 96 and not ns.fp8 and ns.resident_blocks is None


@pytest.mark.parametrize("gpus", ["ax24", "4x", "x24", "4x24x2", "four", "4xlarge"])
def test_bad_gpus_form_is_one_line_user_error(capsys, gpus):
    rc, out, err = run_plan(capsys, "--gpus", gpus, "--auto")
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --gpus") and "4x24" in lines[0]


def test_missing_gpu_memory_is_one_line_user_error(capsys):
    rc, out, err = run_plan(capsys, "--gpus", "4", "--auto")
    assert rc == 2 and out == ""
    assert len(err.splitlines()) == 1 and "--gpu_memory" in err


def test_generate_kv_sink_auto_shares_the_sink_only_where_per_ring_does_not_fit(capsys):
    """`generate --gpu_memory 80` at 704x384 (bf16, all resident): per_ring needs 81.7 GiB, so auto
    takes shared (73.9 GiB) and says so; an explicit per_ring is refused; 90 GiB keeps per_ring."""
    from liveavatar.cli import _check_fits
    from liveavatar.config import S2V_14B
    from liveavatar.errors import UserError
    from liveavatar.runtime.memory import RuntimeConfig

    def check(gib: str, kv_sink: str):
        args = generate_args(["--gpu_memory", gib, "--kv_sink", kv_sink])
        return _check_fits(args, S2V_14B, RuntimeConfig(kv_sink=kv_sink), "cpu", 704, 384, 48, 4)

    table, runtime = check("80", "auto")
    assert runtime == RuntimeConfig(kv_sink="shared") and "fits" in table
    assert "--kv_sink auto: shared" in capsys.readouterr().err
    with pytest.raises(UserError, match="needs 81.7 GiB but the GPU budget is 75.4 GiB"):
        check("80", "per_ring")
    assert check("90", "auto")[1] == RuntimeConfig()
