"""Summarises bench/run's raw runs: medians over repeats, a table, ratios, a JSON file."""
import json
import statistics
import sys

runs = [json.loads(line) for line in open(sys.argv[1])]
targets = [t for t in ["direct", "nginx", "weft1", "nginx2", "weft2", "mtls2", "spread2", "policy2", "traced2"] if any(r["target"] == t for r in runs)]
idle = {r["target"]: r["rss_idle_kib"] for r in runs if r["kind"] == "idle"}


def median(t, f, kind="run"):
    vals = [v for v in (f(r) for r in runs if r["kind"] == kind and r["target"] == t) if v is not None]
    return statistics.median(vals) if vals else None


def cpu_us_per_req(r):
    # CPU over warmup + measured window, divided by the requests sent in that window.
    secs = r["cpu_ticks"] / r["clk_tck"]
    reqs = r["fixed"]["rate"] * (r["warmup_s"] + r["lat_s"])
    return secs / reqs * 1e6


def cpu_us_per_req_max(r):
    # CPU over the throughput window, per request wrk completed in it.
    if "tp_cpu_ticks" not in r or not r["max_rps"]:
        return None
    return r["tp_cpu_ticks"] / r["clk_tck"] / (r["max_rps"] * r["tp_s"]) * 1e6


def cpu_us_per_conn(r):
    # CPU over the connection phase (warm-up included), per connection made in it.
    conns = r["conn"]["conns_per_s"] * r["conn_s"]
    return r["conn_cpu_ticks"] / r["clk_tck"] / conns * 1e6 if conns else None


summary = {}
for t in targets:
    summary[t] = {
        "max_rps": median(t, lambda r: r["max_rps"]),
        "p50_ms": median(t, lambda r: r["fixed"]["p50_ms"]),
        "p99_ms": median(t, lambda r: r["fixed"]["p99_ms"]),
        "p999_ms": median(t, lambda r: r["fixed"]["p999_ms"]),
        "errors": median(t, lambda r: r["fixed"]["errors"]),
        "achieved_rps": median(t, lambda r: r["fixed"]["achieved_rps"]),
        "cpu_us_per_req": None if t == "direct" else median(t, cpu_us_per_req),
        "cpu_us_per_req_max": None if t == "direct" else median(t, cpu_us_per_req_max),
        "rss_idle_mib": idle[t] / 1024 if t in idle else None,
        "rss_peak_mib": None if t == "direct" else median(t, lambda r: r["rss_peak_kib"] / 1024),
        "conns_per_s": median(t, lambda r: r["conn"]["conns_per_s"], "conn"),
        "conn_errors": median(t, lambda r: r["conn"]["errors"], "conn"),
        "cpu_us_per_conn": None if t == "direct" else median(t, cpu_us_per_conn, "conn"),
    }

rate = next(r["fixed"]["rate"] for r in runs if r["kind"] == "run")
cores = next((r.get("cores") for r in runs if r["kind"] == "run"), None)
fmt = lambda v, spec: "-" if v is None else format(v, spec)
print()
if cores == 1:
    print("one core: each proxy pinned to core 0 with one worker; load, backend and control plane on core 1")
print(f"{'':8} {'max rps':>10} {'us/req max':>11} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'CPU us/req':>11} {'RSS idle MiB':>13} {'RSS peak MiB':>13} {'conns/s':>9} {'CPU us/conn':>12}   (latency at {rate} req/s)")
for t in targets:
    s = summary[t]
    print(f"{t:8} {fmt(s['max_rps'], '10.0f')} {fmt(s['cpu_us_per_req_max'], '11.1f')} {fmt(s['p50_ms'], '8.3f')} {fmt(s['p99_ms'], '8.3f')} {fmt(s['p999_ms'], '9.3f')} "
          f"{fmt(s['cpu_us_per_req'], '11.1f')} {fmt(s['rss_idle_mib'], '13.1f')} {fmt(s['rss_peak_mib'], '13.1f')} "
          f"{fmt(s['conns_per_s'], '9.0f')} {fmt(s['cpu_us_per_conn'], '12.1f')}")


def ratio(a, b, key):
    if a not in summary or b not in summary:
        return None
    x, y = summary[a][key], summary[b][key]
    return None if not x or not y else x / y


ratios = {}
for w in ["weft1", "weft2", "mtls2"]:
    for base in ["nginx", "direct"]:
        cpu = ["cpu_us_per_req", "cpu_us_per_req_max"] if base == "nginx" else []
        for key in ["max_rps", "p50_ms", "p99_ms", "p999_ms", "conns_per_s"] + cpu:
            ratios[f"{w}/{base} {key}"] = ratio(w, base, key)
for w in ["weft2", "mtls2"]:
    for key in ["max_rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req"]:
        ratios[f"{w}/nginx2 {key}"] = ratio(w, "nginx2", key)
ratios["mtls2/nginx cpu_us_per_req_max"] = ratio("mtls2", "nginx", "cpu_us_per_req_max")
ratios["nginx2/direct max_rps"] = ratio("nginx2", "direct", "max_rps")
ratios["nginx2/direct p99_ms"] = ratio("nginx2", "direct", "p99_ms")
for key in ["max_rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req"]:
    ratios[f"policy2/mtls2 {key}"] = ratio("policy2", "mtls2", key)
    ratios[f"spread2/mtls2 {key}"] = ratio("spread2", "mtls2", key)
    ratios[f"policy2/spread2 {key}"] = ratio("policy2", "spread2", key)
for key in ["max_rps", "p50_ms", "p99_ms", "p999_ms", "cpu_us_per_req"]:
    ratios[f"traced2/mtls2 {key}"] = ratio("traced2", "mtls2", key)
ratios["mtls2/weft2 conns_per_s"] = ratio("mtls2", "weft2", "conns_per_s")
ratios["mtls2/weft2 cpu_us_per_conn"] = ratio("mtls2", "weft2", "cpu_us_per_conn")
print()
for k, v in ratios.items():
    print(f"{k:32} {fmt(v, '.2f')}")
# Each target with the runs it needs; one whose runs are missing (TARGETS) is skipped.
checks = [
    ("weft1/nginx throughput >= 0.9", ["weft1", "nginx"], lambda: ratios["weft1/nginx max_rps"] >= 0.9),
    ("weft1/nginx CPU per request at max <= 1.2", ["weft1", "nginx"], lambda: ratios["weft1/nginx cpu_us_per_req_max"] <= 1.2),
    (f"weft1/nginx CPU per request at {rate} req/s <= 1.2", ["weft1", "nginx"], lambda: ratios["weft1/nginx cpu_us_per_req"] <= 1.2),
    ("mtls2 CPU per request at max <= 2.5x one nginx hop", ["mtls2", "nginx"], lambda: ratios["mtls2/nginx cpu_us_per_req_max"] <= 2.5),
    ("weft1/nginx p99 <= 1.2", ["weft1", "nginx"], lambda: ratios["weft1/nginx p99_ms"] <= 1.2),
    ("weft1 RSS idle <= 8 MiB", ["weft1"], lambda: summary["weft1"]["rss_idle_mib"] <= 8),
    ("mtls2/direct throughput >= 0.25", ["mtls2", "direct"], lambda: ratios["mtls2/direct max_rps"] >= 0.25),
    ("mtls2/direct p99 <= 3.0", ["mtls2", "direct"], lambda: ratios["mtls2/direct p99_ms"] <= 3.0),
    ("mtls2 CPU per request <= 100 us (two proxies)", ["mtls2"], lambda: summary["mtls2"]["cpu_us_per_req"] <= 100),
    ("policy2/mtls2 CPU per request <= 1.10", ["policy2", "mtls2"], lambda: ratios["policy2/mtls2 cpu_us_per_req"] <= 1.10),
    ("policy2/spread2 CPU per request <= 1.10 (route and retries alone)", ["policy2", "spread2"],
     lambda: ratios["policy2/spread2 cpu_us_per_req"] <= 1.10),
    ("traced2/mtls2 throughput >= 0.90 (tracing costs <= 10 %)", ["traced2", "mtls2"],
     lambda: ratios["traced2/mtls2 max_rps"] >= 0.90),
    ("traced2/mtls2 CPU per request <= 1.15", ["traced2", "mtls2"], lambda: ratios["traced2/mtls2 cpu_us_per_req"] <= 1.15),
]
spans = next((r for r in runs if r["kind"] == "spans"), None)
if spans:
    sink_us = spans["sink_cpu_ticks"] / spans["clk_tck"] / max(spans["exported"], 1) * 1e6
    print(f"\ntraced2 spans: {spans['exported']} exported, {spans['dropped']} dropped; "
          f"the collector (weft-otlp-sink) used {sink_us:.2f} us CPU per span")
targets_met = {}
for name, needs, check in checks:
    # A target some of whose runs are missing (not in TARGETS) is not judged.
    try:
        if all(t in summary for t in needs):
            targets_met[name] = check()
    except (TypeError, KeyError):
        pass
print()
for k, v in targets_met.items():
    print(f"target {k:34} {'met' if v else 'NOT met'}")
json.dump({"rate": rate, "cores": cores, "spans": spans, "summary": summary, "ratios": ratios, "targets": targets_met, "runs": runs},
          open(sys.argv[2], "w"), indent=2)
print(f"\nwrote {sys.argv[2]}")
