"""Property tests: the mesh/rules parsers and the manifest loader accept what they should and
reject everything else with their own error type (never a stray TypeError or KeyError)."""

import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxaccel.startup import planner
from jaxaccel.parallel import sharding as ax
from jaxaccel.checkpoint import layout
from jaxaccel.checkpoint.manifest import CheckpointError, Manifest, check_member_name

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

axis_sizes = st.fixed_dictionaries({}, optional={a: st.sampled_from([1, 2, 4, 8, -1])
                                                 for a in ax.MESH_AXES})


@FAST
@given(st.text(alphabet="datmodelsg=,-0123456789 x", max_size=40))
def test_parse_mesh_accepts_or_raises_its_own_error(text):
    try:
        sizes = ax.parse_mesh(text)
    except ax.MeshSpecError:
        return
    assert set(sizes) == set(ax.MESH_AXES)
    assert all(s >= 1 or s == -1 for s in sizes.values())
    assert list(sizes.values()).count(-1) <= 1


@FAST
@given(axis_sizes)
def test_parse_mesh_round_trips(given_sizes):
    if list(given_sizes.values()).count(-1) > 1:
        return
    text = ",".join(f"{a}={s}" for a, s in given_sizes.items())
    expected = {a: given_sizes.get(a, 1) for a in ax.MESH_AXES}
    assert ax.parse_mesh(text) == expected
    if -1 not in expected.values():
        assert ax.parse_mesh(ax.format_mesh(expected)) == expected


@FAST
@given(axis_sizes, st.sampled_from([1, 2, 3, 4, 6, 8, 16]))
def test_resolved_mesh_divides_the_devices(given_sizes, devices):
    if list(given_sizes.values()).count(-1) > 1:
        return
    sizes = {a: given_sizes.get(a, 1) for a in ax.MESH_AXES}
    try:
        resolved = ax.resolve_mesh_sizes(sizes, devices)
    except ax.MeshSpecError:
        known = math.prod(s for s in sizes.values() if s != -1)
        assert devices % known or known > devices
        return
    assert devices % math.prod(resolved.values()) == 0
    assert all(resolved[a] == s for a, s in sizes.items() if s != -1)


@FAST
@given(st.sampled_from(sorted(ax.RULE_TABLES)),
       st.lists(st.tuples(st.sampled_from(ax.LOGICAL_AXES),
                          st.sampled_from(ax.MESH_AXES + ("None",))), max_size=4))
def test_rule_overrides_apply(table, overrides):
    text = ",".join(f"{logical}={axis}" for logical, axis in overrides)
    rules = ax.resolve_rules(table, text)
    final = dict(overrides)
    for logical, axis in final.items():
        assert rules[logical] == (None if axis == "None" else axis)
    for logical, axis in ax.RULE_TABLES[table].items():
        if logical not in final:
            assert rules[logical] == axis


@FAST
@given(st.text(max_size=30), st.text(max_size=30))
def test_unknown_rules_raise_their_own_error(table, overrides):
    try:
        ax.resolve_rules(table, overrides)
    except ax.MeshSpecError:
        return
    assert table in ax.RULE_TABLES


dims = st.sampled_from([1, 2, 3, 6, 8, 12, 17, 24])
logical = st.sampled_from(ax.LOGICAL_AXES + (None,))


@FAST
@given(st.lists(st.tuples(dims, logical), min_size=1, max_size=4),
       st.sampled_from(["data=8", "model=8", "data=2,model=4", "data=4,model=2",
                        "data=2,model=2,stage=2", None]),
       st.sampled_from(sorted(ax.RULE_TABLES)))
@pytest.mark.cpu_only  # meshes of up to 8 simulated CPU devices (conftest.py)
def test_planner_arithmetic_equals_real_shardings(dims_axes, mesh, rules_name):
    """The planner's fake-mesh arithmetic is exactly what a NamedSharding puts on a device."""
    shape = tuple(d for d, _ in dims_axes)
    axes = tuple(a for _, a in dims_axes)
    layout = ax.Layout.create(mesh, rules_name)
    spec = ax.logical_to_spec(axes, shape, layout.mesh, layout.rules)
    used = [a for a in spec if a is not None]
    assert len(used) == len(set(used))  # a mesh axis shards at most one dim
    if axes[:1] == (ax.LAYERS,) and layout.rules.get(ax.LAYERS) == "stage":
        return  # padded layer stacks: covered against a real restore in test_planner
    shard = layout.sharding(axes, shape).shard_shape(shape)
    assert planner.shard_bytes(shape, axes, 4, dict(layout.mesh.shape), layout.rules) \
        == math.prod(shard) * 4


# ------------------------------------------------------------------------- manifest loader

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                      children, max_size=4),
    max_leaves=20)


def valid_entry():
    shape = st.lists(st.integers(0, 9), max_size=3)
    return shape.flatmap(lambda s: st.fixed_dictionaries({
        "shape": st.just(s),
        "dtype": st.sampled_from(["float32", "bfloat16", "int32"]),
        "axes": st.lists(st.sampled_from(ax.LOGICAL_AXES + (None,)), min_size=len(s),
                         max_size=len(s)),
    }))


def manifest_dict(arrays):
    return {"format_version": 1, "family": "bert", "config": {"hidden_size": 8},
            "dtype": "float32", "arrays": arrays, "tokenizer_files": ["tokenizer.json"]}


@FAST
@given(json_values)
def test_any_json_loads_or_raises_checkpoint_error(raw):
    try:
        Manifest.from_json(raw)
    except CheckpointError:
        pass


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=10), json_values, max_size=3),
       st.dictionaries(st.sampled_from(["shape", "dtype", "axes", "checksum", "chunk_shape",
                                        "chunk_checksums", "nbytes"]), json_values))
def test_damaged_fields_raise_checkpoint_error(top, entry):
    raw = {**manifest_dict({"w": entry}), **{k: v for k, v in top.items()}}
    try:
        Manifest.from_json(raw)
    except CheckpointError:
        pass


@FAST
@given(st.dictionaries(st.text(min_size=1, max_size=12), valid_entry(), max_size=4))
def test_valid_manifests_round_trip_through_json(arrays):
    manifest = Manifest.from_json(manifest_dict(arrays))
    again = Manifest.from_json(json.loads(json.dumps(manifest.to_json())))
    assert again == manifest
    assert again.total_bytes == sum(e.nbytes for e in manifest.arrays.values())


@FAST
@given(st.lists(st.sampled_from(["..", ".", "", "a", "b.json", "/", "~", "\\", "\x00"]),
                min_size=1, max_size=4))
def test_member_names_never_escape(parts):
    name = "/".join(parts)
    try:
        check_member_name(name, "jaxaccel.json")
    except CheckpointError:
        return
    import pathlib

    root = pathlib.Path("/ckpt")
    resolved = (root / name).resolve()
    assert resolved.is_relative_to(root) and resolved != root


@FAST
@given(st.lists(st.integers(0, 7), min_size=0, max_size=3).flatmap(
    lambda s: st.tuples(st.just(s), st.lists(st.integers(1, 4), min_size=len(s),
                                             max_size=len(s)))))
def test_chunk_grid_covers_every_element_once(shape_chunk):
    shape, chunk = shape_chunk
    seen = np.zeros(shape, np.int32)
    count = 0
    for _, slices in layout.chunk_grid(shape, chunk):
        seen[slices] += 1
        count += 1
    assert (seen == 1).all()
    assert count == layout.chunk_count(shape, chunk)
