#!/usr/bin/env python3
"""Deterministic generator of synthetic NYC-taxi-like rides.

Pure standard-library Python (no numpy), written so that it can be re-implemented
bit-for-bit in another language (the Rust engine's built-in generator).  Every
operation below is either 64-bit unsigned integer arithmetic (wrapping mod 2**64)
or IEEE-754 binary64 arithmetic (+ - * / sqrt floor), evaluated in exactly the
order written.  No transcendental functions (sin/log/exp) are used, so results
do not depend on the platform's libm.

Output record (one dict per ride, keys in this order)::

    {"PULocationID": int 1..265, "DOLocationID": int 1..265,
     "trip_distance": float miles (2 decimals), "duration": float minutes (2 decimals)}

Exact specification
-------------------

Constants::

    N_ZONES = 265
    GOLDEN  = 0x9E3779B97F4A7C15
    M1      = 0xBF58476D1CE4E5B9
    M2      = 0x94D049BB133111EB
    MASK    = 2**64 - 1            (all u64 operations wrap modulo 2**64)

Integer mixer (the SplitMix64 finaliser)::

    mix64(x):  x = ((x ^ (x >> 30)) * M1) & MASK
               x = ((x ^ (x >> 27)) * M2) & MASK
               return x ^ (x >> 31)

    unit(h) = (h >> 11) * 2**-53          # u64 -> f64 in [0, 1); exact

Fixed zone table (independent of the seed; the "city" is always the same)::

    for z in 1..=265:
        x[z]     = 8.0 * unit(mix64(z))            # miles, in [0, 8)
        y[z]     = 8.0 * unit(mix64(z + 1000))     # miles, in [0, 8)
        cp       = unit(mix64(z + 2000))
        pu_delay[z] = 10.0 * (cp * cp)              # minutes, pickup congestion
        cd       = unit(mix64(z + 3000))
        do_delay[z] = 6.0 * (cd * cd)               # minutes, dropoff congestion

Random stream (SplitMix64) seeded with ``seed`` (taken as u64, i.e. seed & MASK)::

    state = seed & MASK
    next_u64():  state = (state + GOLDEN) & MASK ; return mix64(state)
    next_f64():  return unit(next_u64())

Per ride, exactly 10 draws, in this order:

1. ``u = next_f64()``; ``r = floor(265.0 * (u * u))`` (integer 0..264);
   ``PULocationID = (r * 97) % 265 + 1``.
   (u*u makes low ranks popular: P(rank 0) ~ 6.1 %, P(rank 264) ~ 0.19 %;
   97 is coprime with 265 so rank -> zone is a permutation.)
2. ``v = next_f64()``; ``r = floor(265.0 * (v * v))``;
   ``DOLocationID = (r * 131) % 265 + 1``.
3. draws 3..6: ``s1 = ((a1 + a2) + a3) + a4 - 2.0`` (four next_f64() values summed
   left to right, then 2.0 subtracted; s1 in [-2, 2), mean 0, sd ~0.577).
4. draws 7..10: ``s2 = ((b1 + b2) + b3) + b4 - 2.0`` likewise.

Then::

    dx = x[PU] - x[DO]
    dy = y[PU] - y[DO]
    d0 = sqrt(dx*dx + dy*dy)                       # straight-line miles
    raw = (1.25 * d0 + 0.3) * (1.0 + 0.15 * s1)     # road detour + noise
    if raw < 0.1: raw = 0.1
    trip_distance = floor(raw * 100.0 + 0.5) / 100.0

    dur = ((2.0 + 3.0 * trip_distance) + pu_delay[PU]) + do_delay[DO] + 1.5 * s2
    if dur < 1.0: dur = 1.0
    duration = floor(dur * 100.0 + 0.5) / 100.0     # minutes

(Expressions are evaluated left to right, e.g. ``a + b + c`` is ``(a + b) + c``;
``1.5 * s2`` is computed before being added.  Do not fuse multiply-adds (no FMA),
so that an implementation in another language reproduces the values exactly.)

Test vectors (a port must reproduce these exactly; the Python and a Rust port
were checked to agree bit-for-bit on 200,000 rides for several seeds)::

    SplitMix64(7).next_u64() == 0x63cbe1e459320dd7
    x[1] == 2.7053328101759178   y[1] == 3.5382972437028695
    pu_delay[1] == 3.1834433767585333   do_delay[1] == 3.197418032609669
    x[265] == 2.2669460335162883 y[265] == 3.7586504879062685
    pu_delay[265] == 0.15072792247534195 do_delay[265] == 2.5503507708153017
    generate(3, seed=7) ==
      [{"PULocationID": 171, "DOLocationID": 1,   "trip_distance": 5.84, "duration": 25.99},
       {"PULocationID": 195, "DOLocationID": 165, "trip_distance": 4.45, "duration": 16.97},
       {"PULocationID": 246, "DOLocationID": 129, "trip_distance": 3.33, "duration": 14.93}]

The target is additive in distance and per-zone effects, so a linear model on
one-hot(PULocationID) + one-hot(DOLocationID) + trip_distance is well specified;
the irreducible noise is ``1.5 * s2`` (sd ~0.87 min) plus the 0.01 rounding.

Usage::

    python scripts/ride_generator.py --n 1000 --seed 7 --format jsonl
    python scripts/ride_generator.py --n 1000 --seed 7 --format csv --out rides.csv

    >>> from ride_generator import generate
    >>> rides = generate(3, seed=7)
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys

N_ZONES = 265
GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK = (1 << 64) - 1
TWO_POW_M53 = 1.0 / 9007199254740992.0  # 2**-53, exact

FIELDS = ["PULocationID", "DOLocationID", "trip_distance", "duration"]
INPUT_FIELDS = ["PULocationID", "DOLocationID", "trip_distance"]


def mix64(x: int) -> int:
    """SplitMix64 finaliser on a u64."""
    x &= MASK
    x = ((x ^ (x >> 30)) * M1) & MASK
    x = ((x ^ (x >> 27)) * M2) & MASK
    return x ^ (x >> 31)


def unit(h: int) -> float:
    """Map a u64 to a float in [0, 1) using its top 53 bits (exact)."""
    return (h >> 11) * TWO_POW_M53


class SplitMix64:
    """Minimal SplitMix64 stream; identical to the Rust reference algorithm."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK

    def next_u64(self) -> int:
        self.state = (self.state + GOLDEN) & MASK
        return mix64(self.state)

    def next_f64(self) -> float:
        return unit(self.next_u64())


def _build_zone_table():
    xs = [0.0] * (N_ZONES + 1)
    ys = [0.0] * (N_ZONES + 1)
    pu_delay = [0.0] * (N_ZONES + 1)
    do_delay = [0.0] * (N_ZONES + 1)
    for z in range(1, N_ZONES + 1):
        xs[z] = 8.0 * unit(mix64(z))
        ys[z] = 8.0 * unit(mix64(z + 1000))
        cp = unit(mix64(z + 2000))
        pu_delay[z] = 10.0 * (cp * cp)
        cd = unit(mix64(z + 3000))
        do_delay[z] = 6.0 * (cd * cd)
    return xs, ys, pu_delay, do_delay


# Index 0 is unused; zones are 1..265.
ZONE_X, ZONE_Y, PU_DELAY, DO_DELAY = _build_zone_table()


def _round2(v: float) -> float:
    return math.floor(v * 100.0 + 0.5) / 100.0


def _draw_zone(rng: SplitMix64, multiplier: int) -> int:
    u = rng.next_f64()
    r = math.floor(265.0 * (u * u))
    return (r * multiplier) % N_ZONES + 1


def _sum4_centered(rng: SplitMix64) -> float:
    a1 = rng.next_f64()
    a2 = rng.next_f64()
    a3 = rng.next_f64()
    a4 = rng.next_f64()
    return ((a1 + a2) + a3) + a4 - 2.0


def iter_rides(n: int, seed: int):
    """Yield ``n`` rides (dicts) for ``seed``; see module docstring for the formula."""
    rng = SplitMix64(seed)
    for _ in range(n):
        pu = _draw_zone(rng, 97)
        do = _draw_zone(rng, 131)
        s1 = _sum4_centered(rng)
        s2 = _sum4_centered(rng)

        dx = ZONE_X[pu] - ZONE_X[do]
        dy = ZONE_Y[pu] - ZONE_Y[do]
        d0 = math.sqrt(dx * dx + dy * dy)
        raw = (1.25 * d0 + 0.3) * (1.0 + 0.15 * s1)
        if raw < 0.1:
            raw = 0.1
        trip_distance = _round2(raw)

        dur = ((2.0 + 3.0 * trip_distance) + PU_DELAY[pu]) + DO_DELAY[do] + 1.5 * s2
        if dur < 1.0:
            dur = 1.0
        duration = _round2(dur)

        yield {
            "PULocationID": pu,
            "DOLocationID": do,
            "trip_distance": trip_distance,
            "duration": duration,
        }


def generate(n: int, seed: int) -> list[dict]:
    """Return a list of ``n`` synthetic rides generated deterministically from ``seed``."""
    if n < 0:
        raise ValueError("n must be >= 0")
    return list(iter_rides(n, seed))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--n", type=int, default=1000, help="number of rides")
    p.add_argument("--seed", type=int, default=7, help="random seed (u64)")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--out", default="-", help="output file (default: stdout)")
    p.add_argument("--id-prefix", default=None,
                   help="if set, add an 'id' field like '<prefix>000001' to each ride")
    args = p.parse_args(argv)

    out = sys.stdout if args.out == "-" else open(args.out, "w", newline="")
    try:
        fields = (["id"] if args.id_prefix is not None else []) + FIELDS
        writer = None
        if args.format == "csv":
            writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
        for i, ride in enumerate(iter_rides(args.n, args.seed), start=1):
            if args.id_prefix is not None:
                ride = {"id": f"{args.id_prefix}{i:06d}", **ride}
            if writer is not None:
                writer.writerow(ride)
            else:
                out.write(json.dumps(ride) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
