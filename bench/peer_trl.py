"""The peer side of the benchmarks: TRL's DPOTrainer and transformers' generate (PyTorch, CPU).

Runs in its own virtual environment (created by `bench.common.peer_python`) as a worker process,
`python -m bench.peer_trl --serve`, driven by bench.common.Worker.
It never imports JAX or bpo_jax. The model is the Hugging Face directory that bpo_jax exported
(`save_hf_model`), so both sides start from the same weights; token ids come from a JSON file
the driver wrote, turned into text for TRL by a word-level tokenizer whose word i is token id i.

DPO steps run inside TRL's own `trainer.train()` loop, on a thread that a callback holds at the
start of every optimizer step until the driver asks for more: a timed step is everything between
`on_step_begin` and `on_step_end` (forward of policy and reference, backward, gradient clipping,
optimizer and scheduler step), as TRL runs it.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import tempfile
import threading
import time

import torch

from bench.common import is_serve_call, peak_rss_mib, reset_peak_rss, rss_mib, serve

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def word_tokenizer(vocab_size: int, pad_id: int, eos_id: int):
    """A fast tokenizer whose i-th word is token id i, words split on whitespace, no added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = [f"w{i}" for i in range(vocab_size)]
    names[pad_id], names[eos_id] = PAD, EOS
    tok = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=PAD)


def ids_to_text(ids: list[int], names: list[str]) -> str:
    return " ".join(names[i] for i in ids)


class _StepGate:
    """A TrainerCallback pair of hooks that holds TRL's loop before each step and times each step."""

    def __init__(self) -> None:
        self.permits = threading.Semaphore(0)
        self.done: queue.Queue = queue.Queue()
        self._start = 0.0

    def callback(self):
        from transformers import TrainerCallback

        gate = self

        class Gate(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                gate.permits.acquire()
                gate._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                gate.done.put(time.perf_counter() - gate._start)

        return Gate()

    def run_steps(self, steps: int, train_thread: threading.Thread) -> list[float]:
        for _ in range(steps):
            self.permits.release()
        times = []
        for _ in range(steps):
            while True:
                try:
                    times.append(self.done.get(timeout=5))
                    break
                except queue.Empty:
                    if not train_thread.is_alive():
                        raise RuntimeError("TRL's training loop stopped early (see the worker log)")
        return times


class PeerWorker:
    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-peer-")

    def info(self) -> dict:
        import peft
        import transformers
        import trl

        return {
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "torch_threads": torch.get_num_threads(),
            "allocator": os.environ.get("LD_PRELOAD") or "glibc malloc",
        }

    # -- DPO ------------------------------------------------------------------------------------
    def dpo_setup(self, model_dir: str, data_path: str, batch_size: int, learning_rate: float, beta: float,
                  max_grad_norm: float, max_steps: int, warmup_steps: int, lora: dict | None = None,
                  seed: int = 0) -> dict:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        torch.manual_seed(seed)
        data = json.loads(open(data_path).read())
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        cfg = model.config
        tokenizer = word_tokenizer(cfg.vocab_size, data["pad_id"], data["eos_id"])
        names = [tokenizer.convert_ids_to_tokens(i) for i in range(cfg.vocab_size)]
        rows = {
            "prompt": [ids_to_text(p, names) for p in data["prompt_ids"]],
            # Leading space: TRL tokenizes prompt + completion as one string.
            "chosen": [" " + ids_to_text(c, names) for c in data["chosen_ids"]],
            "rejected": [" " + ids_to_text(r, names) for r in data["rejected_ids"]],
        }
        args = DPOConfig(
            output_dir=os.path.join(self._tmp.name, "dpo"),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=1,
            max_steps=max_steps,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=max_grad_norm,
            beta=beta,
            loss_type=["sigmoid"],
            max_length=None,
            pad_to_multiple_of=None,
            gradient_checkpointing=False,  # TRL's default is True; bpo_jax runs without remat here
            bf16=False,  # TRL's default is True; both sides run float32
            fp16=False,
            use_cpu=True,
            logging_steps=max_steps + 1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=seed,
        )
        peft_config = None
        if lora:
            from peft import LoraConfig

            peft_config = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=0.0,
                                     target_modules=list(lora["targets"]), task_type="CAUSAL_LM")
        self._gate = _StepGate()
        self._trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                                   processing_class=tokenizer, peft_config=peft_config,
                                   callbacks=[self._gate.callback()])
        # The tokenized dataset must hold exactly the driver's ids.
        first = self._trainer.train_dataset[0]
        if (first["prompt_ids"], first["chosen_ids"]) != (data["prompt_ids"][0], data["chosen_ids"][0]):
            raise RuntimeError("TRL's tokenized example differs from the benchmark's token ids")
        self._thread = threading.Thread(target=self._trainer.train, daemon=True)
        self._thread.start()
        warm = self._gate.run_steps(warmup_steps, self._thread)
        trainable = sum(p.numel() for p in self._trainer.model.parameters() if p.requires_grad)
        return {"warmup_s": warm, "trainable_params": trainable,
                "reference": "adapters disabled" if lora else "separate reference model",
                "optimizer": self._trainer.args.optim, **self.info()}

    def dpo_measure(self, steps: int) -> dict:
        before = rss_mib()
        reset_peak_rss()
        times = self._gate.run_steps(steps, self._thread)
        return {"seconds": times, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}

    # -- reference log-probs ----------------------------------------------------------------------
    def ref_setup(self, model_dir: str, data_path: str, batch_size: int) -> dict:
        """The reference model as TRL's DPOTrainer scores it (its fused LM head), and the pairs in
        batches of `batch_size`, chosen and rejected stacked as TRL's collator does."""
        from transformers import AutoModelForCausalLM
        from trl.trainer.utils import add_fused_lm_head

        self._ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        add_fused_lm_head(self._ref_model)
        data = json.loads(open(data_path).read())
        prompt = torch.tensor(data["prompt_ids"])
        self._ref_batches = []
        for start in range(0, len(prompt), batch_size):
            p = prompt[start:start + batch_size]
            responses = torch.cat([torch.tensor(data[f"{side}_ids"][start:start + batch_size])
                                   for side in ("chosen", "rejected")])
            ids = torch.cat([p.repeat(2, 1), responses], 1)
            completion = torch.cat([torch.zeros_like(p.repeat(2, 1)), torch.ones_like(responses)], 1)
            self._ref_batches.append((ids, completion))
        warm, logps = self._reference_logps()
        return {"warmup_s": warm, "logps": logps, **self.info()}

    def _reference_logps(self) -> tuple[float, list[float]]:
        """(seconds, summed log-probs: per batch its chosen rows, then its rejected rows), the way
        DPOTrainer.compute_ref_log_probs computes them: no_grad, labels -100 outside the completion."""
        start = time.perf_counter()
        out = []
        for ids, completion in self._ref_batches:
            labels = ids.masked_fill(completion == 0, -100)
            with torch.no_grad():
                per_token = self._ref_model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels,
                                            use_cache=False, fused_lm_head=True).log_probs
            out += per_token[:, -(ids.shape[1] - 1):].sum(1).tolist()
        return time.perf_counter() - start, out

    def ref_measure(self) -> dict:
        before = rss_mib()
        reset_peak_rss()
        seconds, _ = self._reference_logps()
        pairs = sum(len(ids) // 2 for ids, _ in self._ref_batches)
        return {"seconds": seconds, "pairs": pairs, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib()}

    # -- generation -----------------------------------------------------------------------------
    def gen_setup(self, model_dir: str, prompt_ids: list[list[int]], n: int, max_new_tokens: int,
                  temperature: float, top_k: int, top_p: float, seed: int = 0) -> dict:
        from transformers import AutoModelForCausalLM

        self._gen_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._gen_ids = torch.tensor(prompt_ids)
        self._gen_kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k or None, top_p=top_p,
                                max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=0)
        self._max_new_tokens = max_new_tokens
        torch.manual_seed(seed)
        warm, out = self._generate()
        return {"warmup_s": warm, "rows": int(out.shape[0]), **self.info()}

    def _generate(self):
        start = time.perf_counter()
        with torch.inference_mode():
            out = self._gen_model.generate(self._gen_ids, attention_mask=torch.ones_like(self._gen_ids),
                                           **self._gen_kwargs)
        return time.perf_counter() - start, out

    def gen_measure(self) -> dict:
        before = rss_mib()
        reset_peak_rss()
        seconds, out = self._generate()
        generated = out.shape[1] - self._gen_ids.shape[1]
        if generated != self._max_new_tokens:  # the exported model has no EOS: every row runs to the end
            raise RuntimeError(f"generate stopped after {generated} of {self._max_new_tokens} tokens")
        new_tokens = int(out.shape[0] * generated)
        return {"seconds": seconds, "new_tokens": new_tokens, "rss_before_mib": before,
                "peak_rss_mib": peak_rss_mib()}


if __name__ == "__main__":
    if not is_serve_call():
        sys.exit("usage: python -m bench.peer_trl --serve  (driven by bench.bench_dpo / bench.bench_sampling)")
    serve(PeerWorker())
