"""bench.serve's command line and its arithmetic; the run itself (a server subprocess under load and faults) is
exercised by running ``python -m bench.serve`` (a CPU smoke run takes a minute or two)."""

import pytest

from bench import serve


@pytest.mark.parametrize("args, message", [
    (["--clients", "1,0"], "--clients"),
    (["--clients", "a"], "--clients"),
    (["--requests-per-client", "0"], "--requests-per-client"),
    (["--max-wait-ms", "-1"], "--max-wait-ms"),
    (["--pretrained", "/nonexistent.pt"], "no such file"),
    (["--backend", "fast"], "--backend"),
])
def test_arguments_checked_in_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        serve.parse_args(args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert [serve.percentile(values, q) for q in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert serve.percentile([3.0], 99) == 3.0


def test_counters_sum_status_codes():
    text = ('fastlclip_requests_total{code="200"} 5.0\nfastlclip_requests_total{code="400"} 2.0\n'
            "fastlclip_batches_total 3.0\nfastlclip_latents_total 9.0\nfastlclip_requests_in_flight 1.0\n")
    assert serve.counters(text) == {"fastlclip_requests_total": 7.0, "fastlclip_batches_total": 3.0,
                                    "fastlclip_latents_total": 9.0, "fastlclip_requests_in_flight": 1.0}
    text += 'fastlclip_requests_total{code="500"} 4.0\nfastlclip_client_disconnects_total 6.0\n'
    out = serve.counters(text)
    assert out["fastlclip_requests_total"] == 11.0 and out["fastlclip_requests_500"] == 4.0
    assert out["fastlclip_client_disconnects_total"] == 6.0


def test_the_fault_runs_hostile_bodies_are_each_a_400(seeded_tiny_model):
    """What the fault run sends as once-500 client input, against the app in-process (the server turns the model's
    own finiteness check off, as here)."""
    import asyncio
    import copy

    import httpx

    import fastlclip
    from fastlclip.serve import create_app

    model = copy.deepcopy(seeded_tiny_model)
    model.check_finite = False
    app = create_app(fastlclip.LatentCLIPReward(model))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.post("/v1/score", content=b, headers=serve.V1) for b in serve.hostile_bodies(16)]

    replies = asyncio.run(go())
    assert len(replies) == 4 and all(r.status_code == 400 for r in replies), [r.text[:100] for r in replies]
