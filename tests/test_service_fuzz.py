"""Property test over every route of the OpenAPI schema: random path parameters, query values
(huge and negative integers, junk text), headers (Range, If-Range, Last-Event-ID) and bodies
(mutated job bodies, random JSON, random uploads) never give a 500, and every refusal is the
documented error object. Bounded: a few hundred requests, in-process."""

import json
import string
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.settings import Settings
from service.store import TERMINAL

EXAMPLES = 400

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)
header_text = st.text(alphabet=string.printable.strip("\r\n\x0b\x0c"), max_size=40)
junk = st.text(max_size=30)
# Boundaries first: the 64-bit edges are where databases overflow.
numbers = (st.sampled_from([2**63 - 1, 2**63, 10**23, -1, -2**63 - 1, 0]) | st.integers(-2**70, 2**70)).map(str)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("fuzz")
    cfg = Settings(data_dir=root / "data", worker_slots=0, allowed_model_roots=str(tiny_llama.parent),
                   max_upload_bytes=4096, max_active_jobs_per_key=1000)
    app = create_app(cfg)
    with TestClient(app) as client:
        store = app.state.store
        client.headers["Authorization"] = f"Bearer {store.create_key('fuzz')[1]}"
        ids = {"model": str(tiny_llama)}

        def restore():
            """Bring back the upload and the finished job if an example deleted them."""
            if "pool" not in ids or store.get_file(owner, ids["pool"]) is None:
                ids["pool"] = client.post("/v1/files", files={"file": ("p.jsonl", b'{"instruction": "a", "output": "b"}\n')},
                                          data={"purpose": "recovery"}).json()["id"]
            if "done" in ids and store.get_job(ids["done"], owner) is not None:
                return
            done = ids["done"] = client.post("/v1/jobs", json={"model": "smollm2-135m", "budget": {"ratio": 0.2}}).json()["id"]
            ckpt = cfg.job_dir(done) / "run" / "final"
            ckpt.mkdir(parents=True)
            (ckpt / "config.json").write_text("{}")
            (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 20)
            (ckpt / ".done").write_text("{}")
            store.claim("w", "cpu", 600)
            store.record(done, "w", [{"kind": "progress", "stage": "x", "step": i, "total": 3} for i in range(3)])
            store.finish(done, "w", "succeeded", result={})

        owner = store.key_owner(client.headers["Authorization"].split()[1])
        restore()
        routes = [(method.upper(), path, op.get("parameters", []))
                  for path, ops in app.openapi()["paths"].items() for method, op in ops.items()]
        yield client, store, ids, routes, restore


def _path_value(draw, name, ids):
    if name == "job_id":
        choices = [ids["done"], "job-" + "0" * 24]
    elif name == "file_id":
        choices = [ids["pool"], "file-nope"]
    elif name == "name":
        choices = ["final", "pruned", "../run"]
    else:
        choices = ["model.safetensors", "config.json", "../../recipe.json", ".done"]
    return draw(st.one_of(st.sampled_from(choices[:1]), st.sampled_from(choices[:1]), st.sampled_from(choices),
                          junk.filter(bool)))


def _job_body(draw, ids):
    base = {"model": draw(st.sampled_from(["smollm2-135m", ids["model"], "org/name", "/etc", ""]) | junk),
            "budget": draw(st.fixed_dictionaries({}, optional={"ratio": st.floats(-1, 2) | json_values,
                                                                "target_params": numbers.map(int) | json_values}))}
    for section in ("data", "pruning", "recovery", "evaluation", "metadata"):
        if draw(st.booleans()):
            base[section] = draw(st.dictionaries(st.sampled_from(["file_id", "selection", "budget", "method",
                                                                  "max_steps", "ppl", "calibration", "importance",
                                                                  "seq_len", "x"]),
                                                 json_values | st.just(ids["pool"]), max_size=3))
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values)  # not even an object
    return base


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_route_gives_a_500(world, data):
    client, store, ids, routes, restore = world
    restore()
    method, path, params = data.draw(st.sampled_from(routes))
    url = path
    for p in params:
        if p["in"] == "path":
            url = url.replace("{" + p["name"] + "}", quote(_path_value(data.draw, p["name"], ids), safe=""))
            url = url.replace("{" + p["name"] + ":path}", quote(_path_value(data.draw, p["name"], ids), safe="/"))
    query = {p["name"]: data.draw(st.one_of(numbers, numbers, junk, st.sampled_from(["true", "false", "1",
                                                                                     ids["done"]])))
             for p in params if p["in"] == "query" and data.draw(st.integers(0, 3))}
    job = store.get_job(ids["done"])
    if "stream" in query and (job is None or job.status not in TERMINAL):
        del query["stream"]  # a stream on a live job would (rightly) not end
    headers = {}
    for name in ("Range", "If-Range", "Last-Event-ID"):
        if data.draw(st.booleans()):
            headers[name] = data.draw(header_text | st.builds(lambda a, b: f"bytes={a}-{b}", numbers, numbers))
    kwargs = {}
    if method == "POST" and path == "/v1/files":
        kwargs["files"] = {"file": (data.draw(junk), data.draw(st.binary(max_size=6000)))}
        kwargs["data"] = {"purpose": data.draw(st.sampled_from(["recovery", "eval"]) | junk)}
    elif method == "POST":
        body = _job_body(data.draw, ids)
        kwargs["content"] = json.dumps(body).encode() if data.draw(st.integers(0, 9)) else data.draw(st.binary())
        headers["content-type"] = "application/json"
    with client.stream(method, url, params=query, headers=headers, **kwargs) as r:
        body = r.read()
    assert r.status_code < 500, (method, url, query, headers, body[:300])
    if method == "HEAD":  # a GET's status and headers, never a body
        assert body == b"", (url, body[:300])
    elif r.status_code >= 400:
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], body

