"""The spec DSL: layout language, loading, overrides, and every bad input of issue 3 item 8."""

import json
import textwrap

import pytest

from hybridlab.arch import count_params, load_model_spec, zoo_names
from hybridlab.arch.layout import LayoutError, parse_layout
from hybridlab.arch.specio import SpecError

GOOD = textwrap.dedent("""\
    name: t
    d_model: 64
    vocab_size: 100
    blocks:
      m3: {mixer: mamba3, d_state: 16, headdim: 16}
      attn: {mixer: attention, heads: 4}
      mlp: {mixer: swiglu, hidden: 128}
    layout: "(m3 mlp) * 2 attn mlp"
    """)


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_layout_language():
    assert parse_layout("a") == ["a"]
    assert parse_layout("(a b) * 2 c") == ["a", "b", "a", "b", "c"]
    assert parse_layout("((a) * 2 b) * 2") == ["a", "a", "b", "a", "a", "b"]
    assert len(parse_layout("(m3 mlp m3 mlp m3 mlp attn mlp) * 3")) == 24
    for bad in ["(a b", "a b)", "a *", "a * 0", "()", "", "a + b", "* 2", "a * x"]:
        with pytest.raises(LayoutError):
            parse_layout(bad)


def test_defaults_and_list_layout(tmp_path):
    spec = load_model_spec(write(tmp_path, GOOD.replace('"(m3 mlp) * 2 attn mlp"', "[m3, mlp, attn, mlp]")))
    assert spec.layers == ["m3", "mlp", "attn", "mlp"]
    m3 = spec.blocks["m3"]
    assert (m3.expand, m3.rope_fraction, m3.rank, m3.trapezoid) == (2, 0.5, 1, True)
    mimo = load_model_spec(write(tmp_path, GOOD.replace("{mixer: mamba3,", "{mixer: mamba3, mode: mimo,"))).blocks["m3"]
    assert mimo.rank == 4 and mimo.d_state == 16
    plain = load_model_spec(write(tmp_path, GOOD.replace("d_state: 16, ", "")))
    assert plain.blocks["m3"].d_state == 128 and plain.blocks["m3"].headdim == 16


def test_overrides(tmp_path):
    spec = load_model_spec(write(tmp_path, GOOD), ["blocks.m3.d_state=32", "layout=m3 mlp", "blocks.m3.mode=mimo"])
    assert spec.blocks["m3"].d_state == 32 and spec.layers == ["m3", "mlp"] and spec.blocks["m3"].rank == 4


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_loads_and_sizes_match_names(name):
    spec = load_model_spec(f"zoo:{name}")
    n = count_params(spec)
    if name.startswith("tiny"):
        assert n <= 2_000_000
        return
    claimed = {"180m": 180e6, "440m": 440e6, "880m": 880e6, "1.5b": 1.5e9}[name.rsplit("-", 1)[1]]
    assert abs(n - claimed) / claimed < 0.02, (name, n)


BAD = [
    # (replace this, with that, expected line, expected fragment)
    ("d_model: 64", "d_model: 64\nd_model: 65", 3, "duplicate key"),
    ("heads: 4}", "heads: 5}", 6, "blocks.attn.heads: 5 does not divide d_model 64"),
    ("heads: 4}", "heads: 4, kv_heads: 3}", 6, "blocks.attn.kv_heads: 3 does not divide heads 4"),
    ("d_state: 16", "d_stat: 16", 5, "did you mean 'd_state'"),
    ("vocab_size: 100", "vocab_sise: 100", 3, "did you mean 'vocab_size'"),
    ("vocab_size: 100", "vocab_size: 0", 3, "vocab_size: must be positive"),
    ("hidden: 128", "hidden: -4", 7, "blocks.mlp.hidden: must be positive"),
    ("d_state: 16", "d_state: 0", 5, "blocks.m3.d_state: must be positive"),
    ("{mixer: mamba3,", "{mixer: mamba3, mode: mimo, rank: 0,", 5, "MIMO rank must be at least 1"),
    ("{mixer: mamba3,", "{mixer: mamba3, rank: 2,", 5, "needs mode: mimo"),
    ("mixer: swiglu", "mixer: swigl", 7, "unknown mixer 'swigl' (did you mean 'swiglu'?)"),
    ('"(m3 mlp) * 2 attn mlp"', '"(m3 mlp) * 2 atn mlp"', 8, "block 'atn' is not defined under blocks (did you mean 'attn'?)"),
    ('"(m3 mlp) * 2 attn mlp"', '"(m3 mlp * 2 attn mlp"', 8, "layout syntax error: unclosed '('"),
    ('"(m3 mlp) * 2 attn mlp"', '"(m3 mlp) * 0"', 8, "repeat count must be at least 1"),
    ("headdim: 16}", "headdim: 24}", 5, "blocks.m3.headdim: 24 does not divide d_inner"),
    ("d_model: 64", "d_model: sixty", 2, "expected an integer"),
    ("name: t", "name: !!python/object/apply:os.system ['echo pwned']", 1, "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("blocks:", "blocks: [", 6, "YAML syntax error: expected ',' or ']', but got '<scalar>' (while parsing a flow sequence started at line 4)"),
    ("{mixer: mamba3,", "{mixer: mamba3, rope: 1,", 5, "expected true or false"),
]


@pytest.mark.parametrize("old,new,line,fragment", BAD, ids=[b[3][:30] for b in BAD])
def test_bad_input_located(tmp_path, old, new, line, fragment):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(SpecError) as e:
        load_model_spec(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{line}") and msg[len(f"{path}:{line}")] in " :", msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_bad_override(tmp_path):
    with pytest.raises(SpecError, match=r"--set blocks.m3.d_stat: unknown key \(did you mean 'd_state'\?\)"):
        load_model_spec(write(tmp_path, GOOD), ["blocks.m3.d_stat=3"])
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_model_spec(write(tmp_path, GOOD), ["blocks.m3.d_state"])


@pytest.mark.parametrize("old,new,line,fragment", BAD[:6], ids=[b[3][:30] for b in BAD[:6]])
def test_cli_bad_input_one_line_exit_2(tmp_path, cli, old, new, line, fragment):
    path = write(tmp_path, GOOD.replace(old, new, 1))
    r = cli("check", path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f"{path}:{line}" in r.stderr and fragment in r.stderr


def test_cli_python_tag_runs_nothing(tmp_path, cli):
    marker = tmp_path / "pwned"
    path = write(tmp_path, GOOD.replace("name: t", f"name: !!python/object/apply:os.system ['touch {marker}']"))
    r = cli("check", path)
    assert r.returncode == 2 and not marker.exists() and "not allowed" in r.stderr


def test_cli_missing_file_and_zoo(cli):
    r = cli("check", "does/not/exist.yaml")
    assert r.returncode == 2 and "file not found" in r.stderr
    r = cli("check", "zoo:tiny-hybrd")
    assert r.returncode == 2 and "did you mean 'tiny-hybrid'" in r.stderr


HAND = textwrap.dedent("""\
    name: hand
    d_model: 32
    vocab_size: 100
    blocks:
      m3: {mixer: mamba3, d_state: 8, headdim: 16}
      attn: {mixer: attention, heads: 4, kv_heads: 2}
      mlp: {mixer: swiglu, hidden: 64}
    layout: m3 mlp attn mlp
    """)


def test_check_numbers_hand_computed(tmp_path, cli):
    r = cli("check", write(tmp_path, HAND), "--json", "--seq-len", "16")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    # Mamba-3: E=64, H=4, P=16, N=8, R=1, 4 rotated dims -> 2 angles.
    in_proj = 32 * (2 * 64 + 2 * 8 + 3 * 4 + 2)  # z, x, B, C, dt/A/lambda, angles
    m3 = in_proj + 64 * 32 + 2 * 4 + 2 * 8 + 2 * 4 * 8  # + out_proj, dt_bias/D (no A bias: heavy tail), B/C norm, B/C bias
    attn = 32 * 32 + 32 * 2 * 2 * 8 + 32 * 32  # q, kv (2 kv heads of 8), o
    mlp = 3 * 32 * 64
    total = 100 * 32 + 5 * 32 + m3 + attn + 2 * mlp  # tied embedding, 4 sub-block norms + final
    assert rep["params"] == total == 25912
    assert rep["params_by_mixer"] == {"mamba3": m3, "swiglu": 2 * mlp, "attention": attn}
    matmul = (in_proj + 64 * 32) + attn + 2 * mlp + 100 * 32
    assert rep["flops_per_token_decode"] == 2 * matmul + 4 * 7 * 16 * 8 + 4 * 4 * 8 * 16
    fwd = 2 * matmul + 4 * (2 * 1 * 16 * (8 + 16) + 6 * 16 * 8) + 4 * 4 * 8 * 16 / 2
    assert rep["flops_per_token_train"] == 3 * fwd
    state = (4 * 16 * 8 * 4 + 4 * (8 + 16) * 2 + 4 * 2 * 4) + 2 * 16 * 2 * 8 * 2
    assert rep["state_bytes"] == state
    assert [row["backend_train"] for row in rep["layers"]] == ["torch", "torch", "sdpa", "torch"]
    assert rep["num_layers"] == 4
