"""Mesh, sharding rules and multi-host helpers on 8 simulated CPU devices (tests/conftest.py)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from espo_jax.models import Decoder, ModelConfig, from_pretrained, save_pretrained
from espo_jax.train import distributed as dist
from espo_jax.train.mesh import (
    DEFAULT_RULES, MESH_AXES, abstract_state, batch_sharding, check_batch, init_sharded,
    logical_to_spec, make_mesh, normalize_rules, opt_state_shardings, param_shardings,
    per_device_bytes, shard_batch)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ModelConfig(family="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                   tie_word_embeddings=True)
# expected spec per parameter on a mesh with fsdp>1 and tensor>1 (path suffix -> spec)
EXPECTED = {
    "embed_tokens": P("tensor", "fsdp"),             # [V, D]: ("vocab", "embed")
    "q_proj/kernel": P("fsdp", "tensor"),            # [D, H*hd]
    "k_proj/kernel": P("fsdp", "tensor"),            # [D, K*hd]
    "v_proj/kernel": P("fsdp", "tensor"),
    "o_proj/kernel": P("tensor", "fsdp"),            # [H*hd, D]
    "gate_proj/kernel": P("fsdp", "tensor"),         # [D, F]
    "up_proj/kernel": P("fsdp", "tensor"),
    "down_proj/kernel": P("tensor", "fsdp"),         # [F, D]
    "layernorm/weight": P(None),                      # RMSNorm scales replicated
    "q_norm/weight": P(None),
    "k_norm/weight": P(None),
    "norm/weight": P(None),
}


def _flat(tree):
    """{'a/b/c': leaf} with Variable '.value' path entries dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        while parts and parts[-1] in ("value", "raw_value"):
            parts.pop()
        out["/".join(parts)] = leaf
    return out


def _expected(path):
    for suffix, spec in EXPECTED.items():
        if path.endswith(suffix):
            return spec
    raise AssertionError(f"no expected spec for {path}")


def _norm(spec):
    """P('a', None) and P('a') shard the same way: compare without trailing Nones."""
    s = list(spec)
    while s and s[-1] is None:
        s.pop()
    return tuple(s)


# ---------------------------------------------------------------------------------------
# mesh
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg,shape", [
    (dict(data=1, fsdp=-1, tensor=1), (1, 8, 1)),
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    (dict(data=-1, fsdp=2, tensor=1), (4, 2, 1)),
    (dict(data=1, fsdp=4, tensor=-1), (1, 4, 2)),
    (dict(data=2, fsdp=1, tensor=1), (2, 1, 1)),   # fewer devices than available
    (dict(data=1, fsdp=1, tensor=1), (1, 1, 1)),
    (None, (1, 8, 1)),
    (dict(data=1, fsdp=2, tensor=1, expert=4), (1, 2, 1, 4)),  # MoE expert parallelism
])
def test_make_mesh_shapes(cfg, shape):
    mesh = make_mesh(cfg)
    assert mesh.axis_names == MESH_AXES
    shape = shape + (1,) * (len(MESH_AXES) - len(shape))  # "expert" defaults to 1
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape
    assert mesh.devices.size == int(np.prod(shape))
    # the first n devices, each once
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices()[:mesh.size])


def test_make_mesh_accepts_configdict():
    import ml_collections
    mesh = make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=-1, tensor=2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


@pytest.mark.parametrize("cfg,msg", [
    (dict(data=3, fsdp=1, tensor=1), "does not divide"),
    (dict(data=-1, fsdp=3, tensor=1), "does not divide"),
    (dict(data=4, fsdp=4, tensor=1), "needs 16 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one"),
    (dict(data=0, fsdp=1, tensor=1), ">= 1 or -1"),
    (dict(data=1, fsdp=-2, tensor=1), ">= 1 or -1"),
])
def test_make_mesh_errors(cfg, msg):
    with pytest.raises(ValueError, match=msg):
        make_mesh(cfg)


# ---------------------------------------------------------------------------------------
# rules -> specs
# ---------------------------------------------------------------------------------------
def test_default_rules_document_the_layout():
    r = normalize_rules(DEFAULT_RULES)
    assert r == {"vocab": "tensor", "embed": "fsdp", "heads": "tensor",
                 "kv_heads": "tensor", "mlp": "tensor", "norm": None, "experts": "expert"}


def test_logical_to_spec_rules_and_fallbacks(caplog):
    mesh = make_mesh(dict(data=1, fsdp=4, tensor=2))
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), shape=(96, 32), mesh=mesh) == P("tensor", "fsdp")
    assert logical_to_spec(("norm",), shape=(32,), mesh=mesh) == P(None)
    assert logical_to_spec(None) == P()
    # a dim that does not divide its mesh axis is replicated, with a logged note
    with caplog.at_level(logging.INFO, logger="espo_jax.train.mesh"):
        assert logical_to_spec(("embed", "mlp"), shape=(30, 64), mesh=mesh,
                               where="w") == P(None, "tensor")
    assert "does not divide" in caplog.text and "w" in caplog.text
    # size-1 mesh axes shard nothing: dropped
    m1 = make_mesh(dict(data=8, fsdp=1, tensor=1))
    assert logical_to_spec(("embed", "mlp"), shape=(32, 64), mesh=m1) == P(None, None)
    # a mesh axis is never used twice in one spec
    assert logical_to_spec(("mlp", "heads"), shape=(64, 64), mesh=mesh) == P("tensor", None)
    # tuples of mesh axes, dict rules, custom rules
    assert logical_to_spec(("embed",), {"embed": ("data", "fsdp")}, shape=(64,),
                           mesh=make_mesh(dict(data=2, fsdp=4, tensor=1))) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
        normalize_rules({"embed": "model"})
    with pytest.raises(ValueError, match="do not match shape"):
        logical_to_spec(("embed",), shape=(4, 4), mesh=mesh)


# ---------------------------------------------------------------------------------------
# parameters and optimizer state on a tiny Decoder
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh_fsdp_tp():
    return make_mesh(dict(data=1, fsdp=4, tensor=2))


@pytest.fixture(scope="module")
def sharded_model(mesh_fsdp_tp):
    return init_sharded(lambda: Decoder(TINY, rngs=nnx.Rngs(0)), mesh_fsdp_tp)


def test_params_are_sharded_as_the_rules_say(sharded_model, mesh_fsdp_tp):
    params = _flat(nnx.state(sharded_model, nnx.Param))
    assert params, "no parameters"
    for path, arr in params.items():
        want = _expected(path)
        assert isinstance(arr.sharding, NamedSharding), path
        assert arr.sharding.mesh.shape == mesh_fsdp_tp.shape
        assert _norm(arr.sharding.spec) == _norm(want), (path, arr.sharding.spec, want)
        # each device holds only its shard
        shard = arr.addressable_shards[0].data.shape
        div = [mesh_fsdp_tp.shape[a] if a else 1 for a in tuple(want) + (None,) * arr.ndim]
        assert shard == tuple(d // k for d, k in zip(arr.shape, div)), path


def test_every_param_has_logical_names():
    abstract = nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0)))
    from espo_jax.train.mesh import variable_logical_axes
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = variable_logical_axes(var)
        assert names is not None and len(names) == len(var.get_value().shape), (path, names)


def test_init_sharded_matches_unsharded_init(sharded_model):
    ref = nnx.state(Decoder(TINY, rngs=nnx.Rngs(0)), nnx.Param)
    got = nnx.state(sharded_model, nnx.Param)
    for (p, a), (_, b) in zip(_flat(ref).items(), _flat(got).items()):
        # same RNG stream; jitted vs eager init may differ by an ulp
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7, err_msg=p)


def test_optimizer_state_sharded_like_params(sharded_model, mesh_fsdp_tp):
    mesh = mesh_fsdp_tp
    p_state = nnx.state(sharded_model, nnx.Param)
    p_sh = param_shardings(p_state, mesh)
    tx = optax.adamw(1e-3)

    # (a) raw optax on the nnx param state: jit the init with opt_state_shardings
    abs_opt = jax.eval_shape(tx.init, p_state)
    o_sh = opt_state_shardings(abs_opt, p_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(p_state)
    # (b) nnx.Optimizer: its moments carry the params' logical names
    opt = nnx.Optimizer(sharded_model, tx, wrt=nnx.Param)
    nnx_state = nnx.state(opt)
    placed = jax.device_put(nnx_state, param_shardings(nnx_state, mesh))

    for tree in (opt_state, placed):
        n_moments = 0
        for path, arr in _flat(tree).items():
            if arr.ndim == 0:  # step counts
                assert _norm(arr.sharding.spec) == (), path
                continue
            n_moments += 1
            assert _norm(arr.sharding.spec) == _norm(_expected(path)), (path, arr.sharding.spec)
        assert n_moments == 2 * len(_flat(p_state))


def test_train_update_keeps_shardings(sharded_model, mesh_fsdp_tp):
    """One jitted AdamW step with in/out shardings: outputs stay sharded as the rules say."""
    mesh = mesh_fsdp_tp
    graphdef, params = nnx.split(sharded_model, nnx.Param)
    params = jax.tree.map(jnp.copy, params)  # the step donates: keep the fixture's arrays
    tx = optax.adamw(1e-3)
    p_sh = param_shardings(params, mesh)
    o_sh = opt_state_shardings(jax.eval_shape(tx.init, params), p_sh)
    opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
    ids = shard_batch(np.arange(8 * 6, dtype=np.int32).reshape(8, 6) % TINY.vocab_size, mesh)
    assert ids.sharding.spec == P(("data", "fsdp"))

    def step(params, opt_state, ids):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(ids)
            return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    fn = jax.jit(step, in_shardings=(p_sh, o_sh, batch_sharding(mesh)),
                 out_shardings=(p_sh, o_sh, None), donate_argnums=(0, 1))
    new_p, new_o, loss = fn(params, opt_state, ids)
    assert np.isfinite(float(loss))
    for path, arr in _flat(new_p).items():
        assert _norm(arr.sharding.spec) == _norm(_expected(path)), path
    # the same step on one device gives the same loss
    one = make_mesh(dict(data=1, fsdp=1, tensor=1))
    p1 = jax.device_put(nnx.state(Decoder(TINY, rngs=nnx.Rngs(0)), nnx.Param),
                        param_shardings(params, one))
    l1 = jax.jit(step)(p1, tx.init(p1), jnp.asarray(np.asarray(ids)))[2]
    np.testing.assert_allclose(float(loss), float(l1), rtol=1e-5)


def test_from_pretrained_places_each_tensor_in_its_sharding(tmp_path, mesh_fsdp_tp):
    mesh = mesh_fsdp_tp
    save_pretrained(Decoder(TINY, rngs=nnx.Rngs(1)), tmp_path / "ckpt")
    model = from_pretrained(tmp_path / "ckpt", dtype=jnp.float32, mesh=mesh)
    state = nnx.state(model, nnx.Param)
    want = param_shardings(state, mesh)   # what the jitted train step will ask for
    total = 0
    for (path, arr), (_, sh) in zip(_flat(state).items(), _flat(want).items()):
        assert arr.sharding.is_equivalent_to(sh, arr.ndim), (path, arr.sharding.spec, sh.spec)
        assert _norm(arr.sharding.spec) == _norm(_expected(path)), path
        assert arr.addressable_shards[0].data.shape == sh.shard_shape(arr.shape), path
        total += arr.nbytes
    # no device holds the whole model: the per-device footprint is ~ total / 8 (+ norms)
    assert per_device_bytes(state) < total / 4


def test_abstract_state_carries_shardings(mesh_fsdp_tp):
    abstract = nnx.eval_shape(lambda: Decoder(TINY, rngs=nnx.Rngs(0)))
    _, st = nnx.split(abstract)
    sds = _flat(abstract_state(st, param_shardings(st, mesh_fsdp_tp)))
    for path, s in sds.items():
        assert isinstance(s, jax.ShapeDtypeStruct)
        assert _norm(s.sharding.spec) == _norm(_expected(path)), path


# ---------------------------------------------------------------------------------------
# batches and multi-host helpers
# ---------------------------------------------------------------------------------------
def test_batch_sharding_and_checks():
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    x = shard_batch({"ids": np.zeros((8, 5), np.int32), "n": np.int32(3)}, mesh)
    assert x["ids"].addressable_shards[0].data.shape == (2, 5)
    assert x["n"].sharding.spec == P()
    check_batch(12, mesh)
    with pytest.raises(ValueError, match="not divisible by mesh.data\\*mesh.fsdp"):
        check_batch(6, mesh)
    g = dist.host_local_to_global({"ids": np.ones((8, 3), np.int32)}, mesh)
    assert g["ids"].shape == (8, 3) and g["ids"].sharding.spec == P(("data", "fsdp"))
    full = {"ids": np.arange(24, dtype=np.int32).reshape(8, 3), "n": np.float32(2.0)}
    gg = dist.device_put_global(full, mesh)
    assert gg["ids"].sharding.spec == P(("data", "fsdp")) and gg["n"].sharding.spec == P()
    np.testing.assert_array_equal(np.asarray(gg["ids"]), full["ids"])
    assert gg["ids"].addressable_shards[1].data.shape == (2, 3)
    assert dist.process_rows(8, mesh) == slice(0, 8)   # one process holds every row
    back = dist.to_host(g)
    assert isinstance(back["ids"], np.ndarray) and back["ids"].shape == (8, 3)


def test_host_slice():
    assert dist.host_slice(8, 0, 1) == slice(0, 8)
    parts = [dist.host_slice(12, i, 4) for i in range(4)]
    assert parts == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 12)]
    assert sorted(sum((list(range(12))[s] for s in parts), [])) == list(range(12))
    with pytest.raises(ValueError, match="cannot be split evenly over 4"):
        dist.host_slice(10, 0, 4)
    with pytest.raises(ValueError, match="process_index 4"):
        dist.host_slice(8, 4, 4)
    assert dist.host_slice(8) == slice(0, 8)  # single process
    assert dist.is_main_process()


@pytest.mark.parametrize("env,reason", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "JAX_COORDINATOR_ADDRESS"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "SLURM_NTASKS"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE"),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "TPU_WORKER_HOSTNAMES"),
])
def test_detect_multihost(env, reason):
    assert dist.detect_multihost(env) == reason


def test_setup_distributed_single_host(monkeypatch):
    called = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: called.append(kw))
    assert dist.setup_distributed({"distributed": {"initialize": False}}, env={}) is False
    assert jax.config.jax_threefry_partitionable
    assert not called
    # asked for by the config (already-initialised check is False here) -> initialize()
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    cfg = {"distributed": {"initialize": True, "coordinator_address": "h:1", "num_processes": 2,
                           "process_id": 1}}
    assert dist.setup_distributed(cfg, env={}) is True
    assert called == [dict(coordinator_address="h:1", num_processes=2, process_id=1)]
    # placeholders mean "detect": nothing passed
    cfg = {"distributed": {"initialize": True, "coordinator_address": "", "num_processes": 0,
                           "process_id": -1}}
    dist.setup_distributed(cfg, env={})
    assert called[-1] == {}
    # multi-node GPU by hand: coordinator from the env (jax reads it), count and id by us
    env = {"JAX_COORDINATOR_ADDRESS": "n0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
    assert dist.setup_distributed(None, env=env) is True
    assert called[-1] == dict(num_processes=4, process_id=2)


def test_sampling_does_not_depend_on_the_mesh():
    """jax_threefry_partitionable: random bits are the same however the output is sharded."""
    dist.setup_distributed(None, env={})
    key = jax.random.key(0)
    ref = np.asarray(jax.random.categorical(key, jnp.zeros((8, 16, 32))))
    for cfg in (dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2)):
        mesh = make_mesh(cfg)
        f = jax.jit(lambda k: jax.random.categorical(k, jnp.zeros((8, 16, 32))),
                    out_shardings=batch_sharding(mesh))
        np.testing.assert_array_equal(np.asarray(f(key)), ref)


# ---------------------------------------------------------------------------------------
# the GPU benchmark script runs (tiny, on CPU)
# ---------------------------------------------------------------------------------------
def test_gpu_check_tiny_runs_on_cpu(tmp_path, capsys):
    """experiments/benchmarks/gpu_check.py --tiny: the whole benchmark path on 8 CPU devices."""
    import importlib.util
    import json
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(REPO, "experiments/benchmarks/gpu_check.py"))
    g = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(g)
    res = g.main(["--tiny", "--steps=1", "--json", str(tmp_path / "r.json")])
    assert "MFU" in capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["step_time_s"] > 0 and r["tokens_per_step"] == 8 * 24 and r["params"] > 0
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1} and np.isfinite(res["loss"])
    assert g.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert g.peak_flops("NVIDIA H100 PCIe") == 756e12 and g.peak_flops("cpu") is None
    # the shell wrapper is syntactically valid
    sh = os.path.join(REPO, "experiments/benchmarks/gpu_check.sh")
    assert subprocess.run(["bash", "-n", sh]).returncode == 0


def test_constrain_batch_is_a_noop_without_a_mesh_and_pins_the_batch_with_one():
    from espo_jax.train.mesh import constrain_batch
    x = np.ones((8, 4), np.float32)
    np.testing.assert_array_equal(jax.jit(lambda a: constrain_batch(a) * 2)(x), 2 * x)
    mesh = make_mesh(dict(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(mesh):
        y = jax.jit(lambda a: constrain_batch(a * 2))(x)
        assert y.sharding.spec == P(("data", "fsdp"))
        z = jax.jit(lambda a: constrain_batch(a * 2))(np.ones((6, 4), np.float32))  # 6 % 4 != 0
        assert z.shape == (6, 4)
    from espo_jax.train.mesh import under_mesh
    f = under_mesh(jax.jit(lambda a: constrain_batch(a * 3)), mesh)
    assert f(x).sharding.spec == P(("data", "fsdp"))
    assert "sharding_constraint" in f.lower(x).as_text()


def test_sharded_rollout_samples_the_same_tokens(sharded_model, mesh_fsdp_tp):
    """generate(decode_fn=sharded_decode_fn(mesh)): rows over ("data","fsdp"), same samples."""
    from espo_jax.rollout import generate
    from espo_jax.train.mesh import sharded_decode_fn
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    kw = dict(max_new_tokens=6, temperature=1.0, key=jax.random.key(3), eos_id=None,
              num_samples=2)
    ref = generate(Decoder(TINY, rngs=nnx.Rngs(0)), prompts, **kw)
    got = generate(sharded_model, prompts, decode_fn=sharded_decode_fn(mesh_fsdp_tp), **kw)
    assert got.tokens.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(ref.logprobs), atol=1e-5)
    # The second half alone (its row ids from first_row): the same rows, still split.
    half = generate(sharded_model, prompts[2:], decode_fn=sharded_decode_fn(mesh_fsdp_tp),
                    first_row=4, **kw)
    assert half.tokens.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(half.tokens), np.asarray(ref.tokens)[4:])


def test_shard_module_moves_an_existing_model(mesh_fsdp_tp):
    from espo_jax.train.mesh import describe_shardings, shard_module
    model = shard_module(Decoder(TINY, rngs=nnx.Rngs(2)), mesh_fsdp_tp)
    for path, arr in _flat(nnx.state(model, nnx.Param)).items():
        assert _norm(arr.sharding.spec) == _norm(_expected(path)), path
    text = describe_shardings(param_shardings(nnx.state(model), mesh_fsdp_tp))
    assert "embed_tokens: P('tensor', 'fsdp')" in text


def test_dcn_split_for_multislice_tpu():
    from espo_jax.train.mesh import dcn_split
    assert dcn_split((4, 8, 1), 1) is None
    assert dcn_split((4, 8, 1), 2) == ((2, 8, 1), (2, 1, 1))
    assert dcn_split((2, 16, 1), 4) is None   # warned: FSDP would cross slices
