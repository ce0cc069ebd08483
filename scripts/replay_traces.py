#!/usr/bin/env python3
"""Replay a routing trace against cache sizes and policies; prints JSON.

    python scripts/replay_traces.py TRACE.jsonl --experts 144 --fractions 0.1 0.25 0.5 0.75

TRACE.jsonl comes from hybrid.load(..., trace="TRACE.jsonl"); --experts is the number of routed
experts over all MoE layers (n_routed_experts x MoE layers), so fractions are of the whole model.
"""
import argparse
import json

from hybrid.bench.replay import replay

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("trace")
ap.add_argument("--experts", type=int, required=True, help="routed experts over all MoE layers")
ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 0.75])
args = ap.parse_args()
print(json.dumps(replay(args.trace, args.fractions, args.experts), indent=2))
