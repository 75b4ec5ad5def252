"""The Ray executor: one actor per engine (one GPU each), the same calls as :class:`LocalExecutor`.

Full noise: members are handed out one at a time, so no engine idles while others work. Low-rank
noise: each actor answers one contiguous share of the population in batched calls (members as
adapters), and a share's answers go to the scorer as soon as it returns. Only seeds,
coefficients, prompts and answers cross the network (weights move only to repair a diverged engine
or to checkpoint). ``cfg.ray_address`` joins an existing (multi-node) cluster, such as the one
``slurm/train_accl_alignment_api.sh`` starts on every node of a job: the actors are spread over
its nodes (one per GPU), and :meth:`RayExecutor.placement` says where each engine runs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

import torch

from alignment.es.engines import Engine, GenerationSettings
from alignment.es.executors import EvalTimings, OnGenerated, run_member, run_share, shares
from alignment.es.lowrank import FULL, NoiseSpec
from alignment.es.noise import require_noise
from alignment.es.population import Member

logger = logging.getLogger(__name__)


def require_capacity(resources: dict[str, float], engines: int, gpus_each: int, address: str | None) -> None:
    """Refuse a run whose engines cannot all be placed (they would wait forever): each takes one CPU
    slot and ``gpus_each`` GPUs of ``resources`` (Ray's ``cluster_resources()``)."""
    where = f"the Ray cluster at {address}" if address else "the local Ray instance"
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cpus < engines:
        raise ValueError(f"{engines} engines need {engines} CPU slots, {where} offers {cpus:g} "
                         "(lower num_engines, or give Ray more CPUs: RAY_CPUS_PER_NODE)")  # fmt: skip
    if gpus < engines * gpus_each:
        raise ValueError(f"{engines} engines need {engines * gpus_each} GPUs, {where} offers {gpus:g} "
                         "(lower num_engines, or ask SLURM for more GPUs or nodes)")  # fmt: skip


def describe_placement(placement: list[dict]) -> list[str]:
    """``node_ip (host): engines a, b`` per node, in engine order."""
    by_node: dict[str, list[str]] = {}
    for p in placement:
        by_node.setdefault(f"{p['node_ip']} ({p['host']})", []).append(str(p["engine"]))
    return [f"{node}: engines {', '.join(engines)}" for node, engines in by_node.items()]


class EngineActor:
    """Holds one engine inside a Ray actor (wrapped with ``ray.remote`` by :class:`RayExecutor`)."""

    def __init__(
        self,
        backend: str,
        model_path: str,
        device: str,
        dtype: str,
        seed: int,
        gpu_util: float,
        keep_base_on: str = "gpu",
        master_dtype: str = "fp32",
        lora_rank: int | None = None,
        max_loras: int = 1,
    ) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if backend == "vllm":
            from alignment.es.engines import VLLMEngine

            self.engine: Engine = VLLMEngine(
                model_path, dtype=dtype, seed=seed, gpu_memory_utilization=gpu_util,
                keep_base_on=keep_base_on, master_dtype=master_dtype,  # type: ignore[arg-type]
                lora_rank=lora_rank, max_loras=max_loras,
            )  # fmt: skip
        else:
            from alignment.es.engines import TransformersEngine

            self.engine = TransformersEngine(model_path, device=device, dtype=dtype, keep_base_on=keep_base_on,
                                             master_dtype=master_dtype)  # type: ignore[arg-type]  # fmt: skip

    def ready(self) -> tuple[str, str]:
        """(checksum, noise id): the weights loaded and the noise this actor's device computes."""
        return self.engine.checksum(), self.engine.noise_id()

    def where(self) -> dict[str, str]:
        """The node this engine runs on: Ray node id and address, host name, process, GPUs."""
        import ray

        ctx = ray.get_runtime_context()
        return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "host": socket.gethostname(), "pid": str(os.getpid()),
                "gpus": ",".join(str(g) for g in ray.get_gpu_ids())}  # fmt: skip

    def run_member(self, member: Member, prompts: list[str], sigma: float, settings: GenerationSettings):
        return run_member(self.engine, member, prompts, sigma, settings)

    def run_share(self, members: list[Member], prompts: list[str], sigma: float, settings: GenerationSettings,
                  rank: int) -> tuple[list[list[str]], float]:  # fmt: skip
        return run_share(self.engine, members, range(len(members)), prompts, sigma, settings, rank)

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        return self.engine.generate(prompts, settings)

    def apply_update(
        self, seeds: list[int], coefficients: list[float], scale: float, noise: NoiseSpec = FULL
    ) -> dict[str, float]:
        return self.engine.apply_update(seeds, coefficients, scale, noise)

    def checksum(self) -> str:
        return self.engine.checksum()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> str:
        self.engine.load_state_dict(state)
        return "ok"


class RayExecutor:
    """One Ray actor per engine (one GPU each when ``device`` is CUDA); joins ``cfg.ray_address``.

    An actor gets the next member the moment it returns the previous one. At start every actor
    proves its device computes the reference noise; one that does not is refused.
    """

    def __init__(self, cfg, device: str, dtype: str) -> None:
        import ray

        self._ray = ray
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True)
        gpus = 1 if device.startswith("cuda") else 0
        require_capacity(ray.cluster_resources(), cfg.num_engines, gpus, cfg.ray_address)
        # SPREAD: engines go to every node of a multi-node cluster (one node: all on it), each
        # still needing its own CPU slot and GPU
        actor_cls = ray.remote(num_cpus=1, num_gpus=gpus, scheduling_strategy="SPREAD")(EngineActor)
        engine_device = "cuda" if gpus else device  # Ray hands each actor its own GPU as cuda:0
        self.actors = [
            actor_cls.remote(
                cfg.backend,
                cfg.policy_model_path,
                engine_device,
                dtype,
                cfg.seed,
                cfg.vllm_gpu_memory_utilization,
                cfg.keep_base_on,
                cfg.master_dtype,
                cfg.noise_rank if cfg.noise == "lowrank" else None,
                cfg.max_loras or cfg.members_per_engine(),
            )  # fmt: skip
            for _ in range(cfg.num_engines)
        ]
        ready = ray.get([a.ready.remote() for a in self.actors])
        require_noise({f"engine {k}": nid for k, (_, nid) in enumerate(ready)})
        sums = [s for s, _ in ready]
        if len(set(sums)) != 1:
            raise RuntimeError(f"engines loaded different weights from {cfg.policy_model_path}: {sums}")
        self._placement = [{"engine": k, "device": engine_device, **w}
                           for k, w in enumerate(ray.get([a.where.remote() for a in self.actors]))]  # fmt: skip
        nodes = sorted({p["node_ip"] for p in self._placement})
        logger.info("%d Ray engine actors ready (%s, %s) on %d node(s): %s", len(self.actors), cfg.backend,
                    engine_device, len(nodes), "; ".join(describe_placement(self._placement)))  # fmt: skip

    def placement(self) -> list[dict]:
        """Where each engine runs: engine index, device, Ray node id and address, host, pid, GPUs."""
        return list(self._placement)

    @property
    def num_engines(self) -> int:
        return len(self.actors)

    def evaluate(
        self,
        members: Sequence[Member],
        prompts: list[str],
        sigma: float,
        settings: GenerationSettings,
        on_generated: OnGenerated,
        noise: NoiseSpec = FULL,
    ) -> EvalTimings:
        ray = self._ray
        timings = EvalTimings.for_engines(self.num_engines)
        prompts_ref = ray.put(prompts)
        if noise.lowrank:
            parts = shares(len(members), self.num_engines)
            refs = {
                self.actors[k].run_share.remote([members[i] for i in part], prompts_ref, sigma, settings,
                                                noise.rank): k
                for k, part in enumerate(parts) if part
            }  # fmt: skip
            while refs:
                [done], _ = ray.wait(list(refs), num_returns=1)
                k = refs.pop(done)
                answers, seconds = ray.get(done)
                timings.generation[k] += seconds
                timings.members[k] += len(parts[k])
                for i, responses in zip(parts[k], answers, strict=True):
                    on_generated(i, responses)
            return timings
        pending: dict = {}
        next_member = 0

        def hand_out(k: int) -> None:
            nonlocal next_member
            if next_member < len(members):
                ref = self.actors[k].run_member.remote(members[next_member], prompts_ref, sigma, settings)
                pending[ref] = (k, next_member)
                next_member += 1

        for k in range(self.num_engines):
            hand_out(k)
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            k, i = pending.pop(done)
            responses, gen_s, pr_s = ray.get(done)
            hand_out(k)  # before scoring, so the engine is busy again at once
            timings.add(k, gen_s, pr_s)
            on_generated(i, responses)
        return timings

    def apply_update(
        self, seeds: list[int], coefficients: list[float], scale: float, noise: NoiseSpec = FULL
    ) -> dict[str, float]:
        return self._ray.get([a.apply_update.remote(seeds, coefficients, scale, noise) for a in self.actors])[
            0
        ]

    def checksums(self) -> list[str]:
        return self._ray.get([a.checksum.remote() for a in self.actors])

    def state_dict(self, engine: int = 0) -> dict[str, torch.Tensor]:
        return self._ray.get(self.actors[engine].state_dict.remote())

    def load_state_dict(self, state: dict[str, torch.Tensor], engines: Sequence[int] | None = None) -> None:
        ref = self._ray.put(state)
        targets = engines if engines is not None else range(self.num_engines)
        self._ray.get([self.actors[k].load_state_dict.remote(ref) for k in targets])

    def generate(self, prompts: list[str], settings: GenerationSettings) -> list[str]:
        return self._ray.get(self.actors[0].generate.remote(prompts, settings))

    def close(self) -> None:
        for actor in self.actors:
            self._ray.kill(actor)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()
