"""The LESS-style peer of the gradient-features benchmark: PyTorch + PEFT, one backward pass per pair.

LESS (Xia et al. 2024) builds per-example gradient features with a Python loop: for each example
a forward and a backward pass, the LoRA gradients flattened into one vector; every
`project_every` vectors are projected together by a random matrix and L2-normalized. This worker
does that for DPO pairs: chosen and rejected in one forward, the sigmoid DPO loss against the
precomputed reference log-probs. It loads the Hugging Face checkpoint bpo_jax exported and sets
the adapters to bpo_jax's values, so its gradients can be checked against bpo_jax's. The
projection matrix is dense, Rademacher (+-1/sqrt(d)) and generated once at setup: the loop's
best case, no generation while timed.

Runs in the peer's virtual environment as `python -m bench.peer_less --serve`, driven by
bench.bench_gradients; it never imports JAX or bpo_jax.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import is_serve_call, serve


class LessWorker:
    """Holds the PEFT model, the pairs and the projection; `measure` times one pass over all pairs."""

    def setup(self, model_dir: str, adapters_path: str, pairs_path: str, rank: int, alpha: float,
              targets: list[str], beta: float, proj_dim: int, project_every: int, threads: int,
              seed: int = 0) -> dict:
        """`adapters_path`: an .npz of PEFT-layout weights named '<module>.lora_A' / '<module>.lora_B',
        in the order their gradients are flattened; `pairs_path`: an .npz of the DPO batch fields."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
        self.model = get_peft_model(base, config).train()
        self.params = []
        with np.load(adapters_path) as adapters, torch.no_grad():
            for name in adapters.files:
                module, kind = name.rsplit(".", 1)
                weight = getattr(base.get_submodule(module), kind)["default"].weight
                weight.copy_(torch.from_numpy(adapters[name]))
                self.params.append(weight)
        trainable = {id(p) for p in self.model.parameters() if p.requires_grad}
        if trainable != {id(p) for p in self.params}:
            raise RuntimeError(f"PEFT made {len(trainable)} trainable tensors; the driver gave {len(self.params)}")
        with np.load(pairs_path) as pairs:
            def both(field: str) -> torch.Tensor:  # [pairs, 2 (chosen, rejected), ...]
                return torch.from_numpy(np.stack([pairs[f"chosen_{field}"], pairs[f"rejected_{field}"]], 1))

            self.ids, self.attention = both("input_ids").long(), both("attention_mask").long()
            self.loss_mask = both("loss_mask").float()
            self.reference = torch.from_numpy(np.stack([pairs["ref_chosen_logps"], pairs["ref_rejected_logps"]], 1))
        self.beta, self.project_every = beta, project_every
        self.num_params = sum(p.numel() for p in self.params)
        generator = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (self.num_params, proj_dim), generator=generator, dtype=torch.int8)
        self.projection = signs.float().mul_(2).sub_(1).div_(math.sqrt(proj_dim))
        self.measure()  # warm-up
        return self.info()

    def info(self) -> dict:
        import peft
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "torch_threads": torch.get_num_threads(), "trainable_params": self.num_params,
                "allocator": os.environ.get("LD_PRELOAD") or "glibc malloc"}

    def _backward(self, pair: int) -> None:
        """Gradient of pair `pair`'s DPO loss into the adapters' .grad."""
        self.model.zero_grad(set_to_none=True)
        ids = self.ids[pair]
        logits = self.model(input_ids=ids, attention_mask=self.attention[pair]).logits
        token_logps = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        chosen, rejected = (token_logps * self.loss_mask[pair, :, 1:]).sum(-1) - self.reference[pair]
        (-F.logsigmoid(self.beta * (chosen - rejected))).backward()

    def measure(self) -> dict:
        """Features of every pair, LESS's way: seconds of the pass, pairs, and gradient_seconds, the
        pass without its projection and normalization (timed apart: the gradients-only rate)."""
        start = time.perf_counter()
        features, pending, projecting = [], [], 0.0
        for pair in range(len(self.ids)):
            self._backward(pair)
            pending.append(torch.cat([p.grad.reshape(-1) for p in self.params]))
            if len(pending) == self.project_every or pair == len(self.ids) - 1:
                begin = time.perf_counter()
                features.append(F.normalize(torch.stack(pending) @ self.projection, dim=1))
                projecting += time.perf_counter() - begin
                pending = []
        seconds = time.perf_counter() - start
        if sum(len(f) for f in features) != len(self.ids):
            raise RuntimeError("the loop produced a feature count other than the pair count")
        return {"seconds": seconds, "gradient_seconds": seconds - projecting, "pairs": len(self.ids)}

    def gradient(self, pair: int) -> dict:
        """Pair `pair`'s flat adapter gradient in bpo_jax's layout (A [in, r], B [r, out]: each
        PEFT weight transposed), for the driver's correctness check."""
        self._backward(pair)
        return {"gradient": torch.cat([p.grad.T.reshape(-1) for p in self.params]).tolist()}


if __name__ == "__main__":
    if not is_serve_call():
        sys.exit("usage: python -m bench.peer_less --serve  (driven by bench.bench_gradients)")
    serve(LessWorker())
