#!/usr/bin/env python3
"""Helpers of scripts/chaos (standard library only).

  sample URL OUT        poll the coordinator's /metrics every 0.1 s; append one line per poll to
                        OUT: "time step generation size recoveries deaths" ("-" when it is down)
  length CLEAN_TSV ...  the chaos job's epochs from the clean run's commit rate (see plan_epochs)
  report ...            the per-fault table and JSON (see main_report)
"""
import json
import math
import re
import sys
import time
import urllib.request

FIELDS = ("eqim_committed_step", "eqim_membership_generation", "eqim_membership_size",
          "eqim_recoveries_total", "eqim_worker_deaths_total")


def scrape(url):
    """One poll: the FIELDS' values, or None when /metrics does not answer."""
    try:
        text = urllib.request.urlopen(url, timeout=1.0).read().decode()
    except Exception:
        return None
    values = {}
    for line in text.splitlines():
        m = re.match(r"^(eqim_[a-z_]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m and m.group(1) in FIELDS and m.group(1) not in values:
            values[m.group(1)] = float(m.group(3))
    return [values.get(f) for f in FIELDS]


def main_sample(url, out):
    with open(out, "a", buffering=1) as f:
        while True:
            t = time.time()
            v = scrape(url)
            cols = ["-" if x is None else str(int(x)) for x in (v or [None] * len(FIELDS))]
            f.write(f"{t:.3f} {' '.join(cols)}\n")
            time.sleep(max(0.0, 0.1 - (time.time() - t)))


def read_samples(path):
    """[(t, step, gen, size, recoveries, deaths)] of the polls that got an answer."""
    rows = []
    for line in open(path):
        p = line.split()
        if len(p) == 6 and "-" not in p[1:]:
            rows.append((float(p[0]), *map(int, p[1:])))
    return rows


def commits(rows):
    """Times at which the committed step rose between two consecutive answers."""
    return [(b[0], b[1]) for a, b in zip(rows, rows[1:]) if b[1] > a[1]]


def rate(rows, batch):
    """(committed samples per second from the first to the last commit, steps, seconds)."""
    c = commits(rows)
    if len(c) < 2:
        return None, 0, 0.0
    first_before = next(r[1] for r in rows if r[0] >= c[0][0]) - 1
    steps = c[-1][1] - first_before
    seconds = c[-1][0] - c[0][0]
    # The first commit's step is counted at its time: (steps - 1) over the interval.
    return (steps - 1) * batch / seconds, steps, seconds


def plan_epochs(clean_tsv, batch, steps_per_epoch, faults_budget_s, spacing_steps, n_faults):
    """Epochs of the chaos job: the steps the faults' spacing needs plus the steps a job
    running at the clean rate (x 1.5 for a smaller, faster group) commits while the faults last,
    plus a tail; from the clean run measured in the same script."""
    r, _, _ = rate(read_samples(clean_tsv), batch)
    if r is None:
        sys.exit("scripts/chaos: the clean run committed fewer than two steps; see its logs")
    steps_per_s = r / batch
    need = (n_faults + 2) * spacing_steps + 1.5 * steps_per_s * faults_budget_s
    return max(2, math.ceil(need / steps_per_epoch)), steps_per_s


def aborted_steps(log_path):
    """Times of the coordinator's "step aborted" log lines."""
    out = []
    for line in open(log_path, errors="replace"):
        if "step aborted" in line:
            try:
                from datetime import datetime
                out.append(datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp())
            except ValueError:
                pass
    return out


def first(rows, t0, pred):
    """Seconds from t0 to the first answer after t0 that satisfies pred, or None."""
    for r in rows:
        if r[0] > t0 and pred(r):
            return round(r[0] - t0, 2)
    return None


def fault_record(ev, rows, all_commits, aborts, workers):
    """One fault's measurements (times in seconds from the fault unless said)."""
    t0, t_heal, t_rec = ev["fired"], ev.get("healed"), ev.get("recovered")
    end = t_rec if t_rec else (rows[-1][0] if rows else t0)
    before = [r[1] for r in rows if r[0] <= t0]
    # A restarting coordinator answers generation 0 (no roster yet) before it has resumed.
    after = [r[1] for r in rows if t0 < r[0] <= end and r[2] > 0]
    rewind = max(0, max(before) - min(after)) if before and after else 0
    n_abort = sum(1 for t in aborts if t0 <= t <= end)
    cs = [t for t, _ in all_commits]
    stall = 0.0
    for a, b in zip(cs, cs[1:]):
        if b > t0 and a < end:
            stall = max(stall, b - a)
    rec = {
        "fault": ev["kind"], "target": ev.get("target"), "step_at_fault": before[-1] if before else None,
        "next_commit_s": first(rows, t0, lambda r, s=before[-1] if before else -1: r[1] > s),
        "longest_stall_s": round(stall, 2),
        "steps_redone": rewind + n_abort, "aborted_steps": n_abort, "rewound_steps": rewind,
        "evicted_after_s": first([r for r in rows if r[0] <= end], t0, lambda r: r[3] < workers),
        "healed_after_s": round(t_heal - t0, 2) if t_heal else None,
        "back_after_heal_s": first(rows, t_heal, lambda r: r[3] >= workers) if t_heal else None,
        "recovered_after_s": round(t_rec - t0, 2) if t_rec else None,
        "notes": ev.get("notes", []),
    }
    return rec


def read_events(path):
    """events.tsv lines "time what kind target" -> one dict per fault."""
    faults = []
    for line in open(path):
        t, what, kind, target = (line.split() + ["-"])[:4]
        t = float(t)
        if what == "fire":
            faults.append({"kind": kind, "target": target, "fired": t, "notes": []})
        elif what in ("healed", "recovered"):
            faults[-1][what] = t
        else:
            who = kind if target == "-" else target
            faults[-1]["notes"].append(f"{what} {who} at +{t - faults[-1]['fired']:.1f} s")
    return faults


def ledger_verdicts(outcome_path):
    try:
        outcome = json.load(open(outcome_path))
    except (OSError, ValueError) as e:
        return None, [f"no outcome.json: {e}"]
    verdicts = []
    for c in outcome.get("coverage", []):
        exact = c["twice"] == 0 and c["more"] == 0 and c["never"] == 0
        verdicts.append({**c, "exact": exact})
    return outcome, verdicts


def print_table(faults):
    cols = ("fault", "target", "step_at_fault", "next_commit_s", "longest_stall_s", "steps_redone",
            "evicted_after_s", "back_after_heal_s", "recovered_after_s")
    print(" ".join(f"{c:>17s}" for c in cols))
    for f in faults:
        print(" ".join(f"{'-' if f[c] is None else str(f[c]):>17s}" for c in cols))
        for n in f["notes"]:
            print(f"{'':>17s} note: {n}")


def main_report(argv):
    """report CLEAN_DIR CHAOS_DIR BATCH WORKERS OUT_JSON LOAD_TEXT"""
    clean, chaos, batch, workers, out_json, load = argv
    batch, workers = int(batch), int(workers)
    clean_rows, chaos_rows = read_samples(f"{clean}/metrics.tsv"), read_samples(f"{chaos}/metrics.tsv")
    all_commits = commits(chaos_rows)
    aborts = aborted_steps(f"{chaos}/logs/coord.log")
    faults = [fault_record(ev, chaos_rows, all_commits, aborts, workers)
              for ev in read_events(f"{chaos}/events.tsv")]
    clean_rate, clean_steps, clean_s = rate(clean_rows, batch)
    chaos_rate, chaos_steps, chaos_s = rate(chaos_rows, batch)
    clean_outcome, clean_ledger = ledger_verdicts(f"{clean}/job/outcome.json")
    outcome, ledger = ledger_verdicts(f"{chaos}/job/outcome.json")
    ok_ledger = bool(ledger) and all(isinstance(v, dict) and v["exact"] for v in ledger + clean_ledger)
    report = {
        "machine_load": load, "workers": workers, "global_batch": batch,
        "clean": {"samples_per_s": clean_rate, "committed_steps": clean_steps, "seconds": clean_s,
                  "finished": bool(clean_outcome and clean_outcome.get("finished"))},
        "chaos": {"samples_per_s": chaos_rate, "committed_steps": chaos_steps, "seconds": chaos_s,
                  "finished": bool(outcome and outcome.get("finished")),
                  "stop_reason": outcome.get("stop_reason") if outcome else None,
                  "recoveries": outcome.get("recoveries") if outcome else None,
                  "recovery_seconds": outcome.get("recovery_seconds") if outcome else None,
                  "aborted_steps": outcome.get("aborted_steps") if outcome else None},
        "throughput_ratio": chaos_rate / clean_rate if clean_rate and chaos_rate else None,
        "faults": faults, "ledger": ledger, "clean_ledger": clean_ledger, "ledger_exact": ok_ledger,
    }
    with open(out_json, "w") as f:
        json.dump(report, f, indent=1)
    print_table(faults)
    fmt = lambda x: "-" if x is None else f"{x:.1f}"
    print(f"throughput: clean {fmt(clean_rate)} samples/s ({clean_steps} steps in {clean_s:.1f} s), "
          f"chaos {fmt(chaos_rate)} samples/s ({chaos_steps} steps in {chaos_s:.1f} s)"
          + (f": {100 * report['throughput_ratio']:.1f} % of clean" if report["throughput_ratio"] else ""))
    for v in ledger:
        print(f"ledger epoch {v['epoch']}: " + ("each sample exactly once" if v.get("exact") else
              f"NOT EXACT (once {v['once']}, twice {v['twice']}, more {v['more']}, never {v['never']})")
              if isinstance(v, dict) else f"ledger: {v}")
    print(f"report: {out_json}")
    return 0 if ok_ledger and report["chaos"]["finished"] else 1


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sample":
        main_sample(*args)
    elif cmd == "length":
        epochs, sps = plan_epochs(args[0], int(args[1]), int(args[2]), float(args[3]), int(args[4]), int(args[5]))
        print(epochs, f"{sps:.4f}")
    elif cmd == "report":
        sys.exit(main_report(args))
    else:
        sys.exit(f"unknown command {cmd}")
