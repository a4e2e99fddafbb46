"""Episodes per second of the three episode sources of `weakicl train`, on this machine.

numpy synthetic and real episodes are drawn in this one process, as one DataLoader worker draws them
(a run with W workers gets at most W times that); torch synthetic episodes (`device_episodes`) are
drawn a step's batch at a time on --device. Prints one JSON object.

    python scripts/benchmark_episodes.py --config configs/gpu_v02.json --device cpu --seconds 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def rate(draw, seconds: float, synchronize=lambda: None) -> dict:
    """Episodes per second of `draw()` (which returns how many it drew), after one warm-up call."""
    draw()
    synchronize()
    episodes, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        episodes += draw()
    synchronize()
    elapsed = time.monotonic() - started
    return {"episodes": episodes, "seconds": round(elapsed, 2), "episodes_per_s": round(episodes / elapsed, 2)}


def main() -> None:
    from weakicl.network import NetConfig
    from weakicl.training.data import CachedSubjects, load_cases
    from weakicl.training.device_episodes import DeviceEpisodes
    from weakicl.training.episodes import EpisodeConfig, EpisodeSampler
    from weakicl.training.loop import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpu_v02.json")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seconds", type=float, default=20.0, help="per source")
    parser.add_argument("--cache", help="the real-data cache (default: the config's)")
    parser.add_argument("--batch", type=int, help="device episodes per call (default: the config's device share of a step)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TrainConfig.from_file(args.config)
    net = NetConfig(**config.net)
    episodes = EpisodeConfig(**config.episodes)
    batch = args.batch or max(round(config.episodes_per_step * config.device_synthetic_fraction), 1)
    step = iter(range(10**9))
    report = {"config": args.config, "patch_size": list(net.patch_size), "threads": torch.get_num_threads()}
    synthetic = EpisodeSampler(episodes, net.patch_size, net.working_spacing_mm, config.seed)
    report["numpy_synthetic_per_worker"] = rate(lambda: [synthetic.sample(np.random.default_rng([0, next(step)]))] and 1, args.seconds)
    cache = args.cache or config.cache
    if cache:
        real = CachedSubjects(load_cases(cache, "train"), net.patch_size, config.collection_weights,
                              episodes.fit_fraction, episodes.frame_fill)
        sampler = EpisodeSampler(episodes, net.patch_size, net.working_spacing_mm, config.seed, real)
        sampler.config.synthetic_fraction = 0.0
        report["numpy_real_per_worker"] = rate(lambda: [sampler.sample(np.random.default_rng([0, next(step)]))] and 1, args.seconds)
    device = DeviceEpisodes(episodes, net.patch_size, net.working_spacing_mm, config.seed, args.device)
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    report[f"torch_synthetic_on_{args.device}"] = rate(lambda: len(device.sample(next(step), batch).modes), args.seconds, synchronize)
    report[f"torch_synthetic_on_{args.device}"]["batch"] = batch
    report["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
