"""Ahead-of-time compile of an ESPO train step for a Qwen3-1.7B-shaped model on a simulated
8-device mesh (fsdp=4, tensor=2): abstract shapes only, no weights; prints per-device memory.

It is the dry run's compile (``espo_jax.train.aot.compile_phases``, what
``python -m espo_jax.main --dry_run`` runs) of the product's ``make_train_step`` (forward
over prompt + response -> chunked token log-probs -> policy_loss("espo") -> grads -> clip ->
AdamW), jitted with the state shardings and the state donated, for ``configs/qwen3_math.py``
with a config.json of Qwen3-1.7B's shape. Compiling all 28 (unrolled) layers takes ~90 s
on 2 CPU cores, so the test compiles 1 and 2 layers and extrapolates linearly per layer to
28; set ESPO_AOT_FULL=1 to compile all 28 layers instead. Arguments extrapolate exactly;
temporaries only approximately (XLA schedules weight all-gathers differently with more
layers; with the earlier flattened log-prob op and XLA:CPU's default scheduler the
1+2-layer estimate was 3.85 GiB vs 3.58 GiB from a full 28-layer compile). The dry run
compiles with XLA:CPU's memory-optimised scheduler. The batch-parallel log-prob op holds
a per-device dW partial [D, V/tensor] f32 and the unembedding gathered along D (f32 on
XLA:CPU, which upcasts bf16): with Qwen3's 151,936-token vocabulary 3.93 GiB of
temporaries here vs 2.79 GiB with the flattened op (jax 0.10.2), in exchange for no
activation all-gather, no per-block logits all-reduce and 1/devices of the logits work.
"""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 28
B, P_LEN, N_LEN = 8, 64, 192   # global batch of 8 sequences, 256 tokens each
# Qwen3-1.7B's config.json (the shape; no weights are needed)
QWEN3_1P7B = dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936,
                  hidden_size=2048, intermediate_size=6144, num_hidden_layers=LAYERS,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                  hidden_act="silu", max_position_embeddings=40960, rms_norm_eps=1e-6,
                  rope_theta=1000000, tie_word_embeddings=True, attention_bias=False,
                  torch_dtype="bfloat16")


def _config(model_dir):
    spec = importlib.util.spec_from_file_location(
        "qwen3_math", os.path.join(REPO, "configs", "qwen3_math.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()  # bf16 compute, f32 master weights + AdamW, remat per layer
    c.model.path = str(model_dir)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
    c.rollout.prompts_per_step, c.rollout.group_size = 1, B
    c.rollout.max_new_tokens = N_LEN
    c.plan.prompt_len = P_LEN
    c.train.num_minibatches = 1
    c.train.micro_batch_per_device = 0
    c.train.micro_batch_size = 0
    c.score.chunk_size = 512
    return c


def _compile(config, layers: int):
    from espo_jax.train import aot
    from espo_jax.train.mesh import batch_divisor, make_mesh

    mesh = make_mesh(config.mesh)
    shapes = aot.plan_shapes(config, batch_divisor(mesh))
    assert (shapes.minibatch_rows, shapes.prompt_len, shapes.response_len) == (B, P_LEN, N_LEN)
    r = aot.compile_phases(config, mesh, shapes, num_layers=layers, phases=("train_step",))
    m = r["train_step"]
    return dict(args=m["argument"], temp=m["temp"], out=m["output"], alias=m["alias"],
                params=r["_n_params"], compile_s=m["compile_s"])


def _gib(x):
    return x / 2**30


@pytest.mark.slow
def test_aot_train_step_qwen3_1p7b_fsdp4_tensor2(capsys, tmp_path):
    assert jax.device_count() == 8
    (tmp_path / "config.json").write_text(json.dumps(QWEN3_1P7B))
    config = _config(tmp_path)
    if os.environ.get("ESPO_AOT_FULL"):
        full = _compile(config, LAYERS)
        est = {k: full[k] for k in ("args", "temp", "params")}
        how = f"compiled all {LAYERS} layers in {full['compile_s']:.0f} s"
        small = full
    else:
        small, big = _compile(config, 1), _compile(config, 2)
        per = {k: big[k] - small[k] for k in ("args", "temp", "params")}
        est = {k: small[k] + (LAYERS - 1) * per[k] for k in ("args", "temp", "params")}
        how = (f"compiled 1 and 2 layers ({small['compile_s']:.0f} s + {big['compile_s']:.0f} s) "
               f"and EXTRAPOLATED linearly to {LAYERS} layers: per layer "
               f"+{per['args'] / 2**20:.1f} MiB arguments, +{per['temp'] / 2**20:.1f} MiB temporaries "
               "(temporaries approximate; ESPO_AOT_FULL=1 compiles all layers)")

    # the step's shardings really are used: params + 2 Adam moments (f32) split 8 ways
    state_bytes = 3 * 4 * est["params"]
    assert est["params"] == pytest.approx(1.72e9, rel=0.01)   # Qwen3-1.7B: 1.72B incl. tied embedding
    assert est["args"] == pytest.approx(state_bytes / 8, rel=0.02), (est["args"], state_bytes / 8)
    # donation: the new params / moments reuse the input buffers
    assert small["alias"] >= 0.95 * small["args"]

    with capsys.disabled():
        print(f"\n[AOT] Qwen3-1.7B-shaped ESPO train step, mesh data=1 fsdp=4 tensor=2 "
              f"(8 simulated CPU devices), batch {B} x {P_LEN + N_LEN} tokens, bf16 compute, "
              f"f32 master weights + AdamW, remat per layer")
        print(f"[AOT] {how}")
        print(f"[AOT] params {est['params'] / 1e9:.3f} B; per device: arguments (params + "
              f"Adam state, donated) {_gib(est['args']):.2f} GiB, temporaries (grads, "
              f"activations) {_gib(est['temp']):.2f} GiB, total "
              f"{_gib(est['args'] + est['temp']):.2f} GiB "
              f"(unsharded state would be {_gib(state_bytes):.1f} GiB)")
