"""The SGLang mock (tests/sglang_mock.py) and Flux's SGLang client, held against the real SGLang 0.5.23.

Reads the real wheel (`pip download sglang==0.5.23 --no-deps`; `.ci/run` downloads it and sets
FLUX_SGLANG_WHEEL to the .whl, or to an unpacked copy). Nothing is installed or imported from the
package as a whole: the route table, the request classes and the unpickler's allowlist are read from the
source with `ast`, and the few self-contained modules (the generated JSON contract
`sglang/api/v1/api_types.py`, `weight_sync/tensor_bucket.py`, the `SafeUnpickler` class) are executed
on their own, so the bodies and payloads Flux sends are checked by SGLang's own code.

A failure here means the mock (or the client) drifted from the real server: fix the mock from the
source, then the client.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from flux.engine.base import SamplingParams
from flux.integrations.sglang.engine import PAUSE_MODES, SGLangEngine
from flux.integrations.sglang.weights import buckets, distributed_request, flatten, serialize
from tests import sglang_mock as mock_mod

VERSION = "0.5.23"


class Wheel:
    """Source files of the wheel, from the .whl itself or an unpacked directory."""

    def __init__(self, where: str):
        self.path = Path(where)
        self._zip = zipfile.ZipFile(self.path) if self.path.is_file() else None

    def read(self, name: str) -> str:
        if self._zip is not None:
            return self._zip.read(name).decode()
        return (self.path / name).read_text()

    def module(self, name: str, extra: dict | None = None) -> types.ModuleType:
        """Execute one self-contained source file as a module of its own."""
        mod = types.ModuleType("sglang_wheel." + name.replace("/", ".").removesuffix(".py"))
        mod.__dict__.update(extra or {})
        sys.modules[mod.__name__] = mod  # dataclasses and msgspec look their module up there
        exec(compile(self.read(name), name, "exec"), mod.__dict__)  # noqa: S102 (the pinned wheel's code)
        return mod


@pytest.fixture(scope="module")
def wheel() -> Wheel:
    where = os.environ.get("FLUX_SGLANG_WHEEL", "")
    if not where or not Path(where).exists():
        pytest.skip("the SGLang wheel is not here: pip download sglang==0.5.23 --no-deps, then set "
                    "FLUX_SGLANG_WHEEL to it (.ci/run does)")
    w = Wheel(where)
    assert f"__version__ = version = '{VERSION}'" in w.read("sglang/_version.py"), "not the SGLang Flux targets"
    return w


def real_routes(source: str) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """path -> (methods, the io_struct class of its body) from http_server.py's FastAPI decorators."""
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for d in node.decorator_list:
            if not (isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
                    and d.func.attr in ("get", "post", "put", "api_route") and d.args
                    and isinstance(d.args[0], ast.Constant)):
                continue
            methods = next((ast.literal_eval(k.value) for k in d.keywords if k.arg == "methods"),
                           [d.func.attr.upper()])
            body = None
            for arg in node.args.args:
                ann = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                name = ann.removeprefix("Annotated[").split(",")[0].rstrip("]")
                if name.endswith(("ReqInput", "Req")):
                    body = name
            out[d.args[0].value] = (tuple(sorted(methods)), body)
    return out


def class_fields(source: str) -> dict[str, dict[str, str]]:
    """class name -> {field: annotation} of io_struct's classes, the fields of their bases included."""
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def fields(name: str) -> dict[str, str]:
        node = classes[name]
        out = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for st in node.body:
            if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name):
                out[st.target.id] = ast.unparse(st.annotation)
        return out

    return {name: fields(name) for name in classes}


def test_the_mock_serves_the_real_routes_with_their_methods_and_bodies(wheel):
    real = real_routes(wheel.read("sglang/srt/entrypoints/http_server.py"))
    for path, (methods, body) in mock_mod.ROUTES.items():
        assert path in real, f"{path} is not a route of SGLang {VERSION}"
        assert real[path] == (tuple(sorted(methods)), body), (path, real[path])


def test_the_mock_checks_the_real_request_fields(wheel):
    real = class_fields(wheel.read("sglang/srt/managers/io_struct.py"))
    for name, fields in mock_mod.REQUEST_FIELDS.items():
        assert set(fields) == set(real[name]), (name, sorted(set(fields) ^ set(real[name])))
    for name, required in mock_mod.REQUIRED.items():
        src = ast.parse(wheel.read("sglang/srt/managers/io_struct.py"))
        node = next(n for n in src.body if isinstance(n, ast.ClassDef) and n.name == name)
        no_default = {st.target.id for st in node.body if isinstance(st, ast.AnnAssign) and st.value is None}
        assert set(required) == no_default, (name, required, no_default)
    assert f"Literal{list(PAUSE_MODES)}".replace("'", '"') == real["PauseGenerationReqInput"]["mode"].replace("'", '"')
    assert mock_mod.PAUSE_MODES == PAUSE_MODES


def test_the_mock_unpickles_with_the_real_allowlist(wheel):
    source = wheel.read("sglang/srt/utils/common.py")
    tree = ast.parse(source)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SafeUnpickler")
    allowed = next(ast.literal_eval(st.value) for st in cls.body
                   if isinstance(st, ast.Assign) and st.targets[0].id == "ALLOWED_GLOBALS")
    assert mock_mod.ALLOWED_GLOBALS == allowed, sorted(mock_mod.ALLOWED_GLOBALS ^ allowed)


def real_unpickler(wheel: Wheel):
    """SGLang's SafeUnpickler (and the storage loader it delegates to), executed from its source."""
    source = wheel.read("sglang/srt/utils/common.py")
    tree = ast.parse(source)
    parts = [ast.get_source_segment(source, n) for n in tree.body
             if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name in ("SafeUnpickler", "_safe_load_torch_storage")]
    ns = {"pickle": pickle, "io": io, "torch": torch}
    exec(compile("\n\n".join(parts), "sglang/srt/utils/common.py", "exec"), ns)  # noqa: S102
    return ns["SafeUnpickler"]


def test_flux_payloads_open_with_the_real_unpickler_and_bucket(wheel):
    import base64

    SafeUnpickler = real_unpickler(wheel)
    bucket_mod = wheel.module("sglang/srt/weight_sync/tensor_bucket.py")
    state = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(5), "c.emb": torch.randn(2, 2).bfloat16()}
    for bucket in buckets(state, max_bytes=1 << 20):
        flat, metadata = flatten(bucket)
        data = SafeUnpickler(io.BytesIO(base64.b64decode(serialize(flat, metadata), validate=True))).load()
        # what _update_weights_from_flattened_bucket does with it
        meta = [bucket_mod.FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype, start_idx=m.start_idx,
                                                   end_idx=m.end_idx, numel=m.numel) for m in data["metadata"]]
        got = bucket_mod.FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=meta)
        for (name, t), (want_name, want) in zip(got.reconstruct_tensors(), bucket):
            assert name == want_name and t.dtype == want.dtype and torch.equal(t, want)
        # the receiving side of a broadcast allocates exactly the bytes Flux broadcasts
        body = distributed_request(bucket, group_name="g")
        empty = bucket_mod.FlattenedTensorBucket.empty(body["names"], body["dtypes"], body["shapes"], "cpu")
        assert empty.get_flattened_tensor().dtype == flat.dtype == torch.uint8
        assert empty.get_flattened_tensor().numel() == flat.numel()
        assert [(m.start_idx, m.end_idx) for m in empty.get_metadata()] == [(m.start_idx, m.end_idx) for m in metadata]
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):  # the real one refuses, as the mock does
        SafeUnpickler(io.BytesIO(pickle.dumps(os.getcwd))).load()


def test_every_generate_body_flux_sends_passes_the_real_schema(wheel):
    api = wheel.module("sglang/api/v1/api_types.py")
    fields = set(api.SamplingParams.__struct_fields__)
    assert mock_mod.SAMPLING_KEYS == fields, sorted(mock_mod.SAMPLING_KEYS ^ fields)
    server = mock_mod.MockSGLang(vocab_size=64)
    url = server.start()
    try:
        engine = SGLangEngine(url, max_concurrency=8)
        engine.generate([[1, 2], [3]], SamplingParams(max_new_tokens=3, temperature=0.7, top_k=5, seed=3,
                                                      stop_token_ids=(9,)))
        engine.generate([[4, 5]], SamplingParams(max_new_tokens=2, top_p=0.9))
        engine.score([[1, 2]], [[3, 4]])
        engine.close()
    finally:
        server.stop()
    bodies = [b for p, b in server.calls if p == "/generate"]
    assert len(bodies) == 4
    for body in bodies:
        api.GenerateRequest.from_json_value(body)  # raises JsonContractError on a violation
    with pytest.raises(api.JsonContractError):  # and it does reject what SGLang rejects
        api.GenerateRequest.from_json_value({"input_ids": [1], "sampling_params": {"max_tokens": 3}})


def test_the_mocks_weight_update_answers_are_the_real_ones(wheel):
    def joined(name: str) -> str:  # adjacent string literals as one
        return re.sub(r'"\s*\n\s*"', "", wheel.read(name))

    updater = joined("sglang/srt/managers/scheduler_components/weight_updater.py")
    mock = mock_mod.MockSGLang()
    for what in ("update_weights_from_tensor", "update_weights_from_distributed"):
        assert mock._outside_session(what)[1]["message"] in updater
    for answer in (mock.end_weight_update({}), (mock.begin_weight_update({}), mock.begin_weight_update({}))[1]):
        assert answer[0] == 400 and answer[1]["message"] in updater, answer
    runner = joined("sglang/srt/model_executor/model_runner_components/weight_updater.py")
    assert mock.destroy_weights_update_group({})[1]["message"] in runner
