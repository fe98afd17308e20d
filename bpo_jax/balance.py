"""Knowledge breadth and depth (BPO, Wang et al., NAACL 2025): breadth compression, uniform balancing.

Breadth B = number of unique prompts; depth K = pairs per prompt (`bpo_jax.data.stats` reports both
for any data file). The paper's body was not available to us; these operational definitions are ours:

Breadth compression keeps B' representative prompts. Every unique prompt is embedded and the
embedding L2-normalized (so Euclidean k-means works on cosine geometry); scikit-learn's k-means
splits them into B' clusters; from each cluster the member nearest its centroid is kept (ties:
the earlier prompt). Near-duplicate prompts fall into one cluster and collapse to one. Embedders:
  policy  mean over prompt tokens of the policy model's final (normed) hidden state, batched under
          jit; the prompt is rendered and cut exactly as sampling will see it
  tfidf   TF-IDF (sublinear tf) + TruncatedSVD to `dim` components: no model needed
  minilm  the all-MiniLM-L6-v2 sentence encoder (bpo_jax.models.encoder; the `assets` extra)

Uniform balancing gives every prompt the same depth k from its m scored responses: an optional
first pair (the pipeline passes the pairs.strategy pick), then all pairs (i, j) with r_i > r_j,
ordered by reward margin r_i - r_j (largest first; ties by lower i, then lower j), are taken
greedily while both responses appear in fewer than `max_uses` pairs so far (default m - 1, which
only forbids repeating a pair). A prompt with fewer eligible pairs gets
fewer, counted in the report.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bpo_jax.data.schema import PromptRecord, Text, prompt_key
from bpo_jax.data.tokenize import encode_prompts, render_prompt
from bpo_jax.models.llama import CausalLM
from bpo_jax.sampling import bucket_length, keep_last, pad_tokens, to_host
from bpo_jax.sharding import batch_sharding
from bpo_jax.tokenizer import Tokenizer

EMBEDDERS = ("policy", "tfidf", "minilm")


# -- embeddings -------------------------------------------------------------------------------------


def prompt_text(prompt: Text) -> str:
    """Plain text of a prompt: itself, or its messages' contents one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


@partial(jax.jit, static_argnums=0)
def _mean_hidden(graphdef, state, ids, mask):
    hidden = nnx.merge(graphdef, state).hidden_states(ids, mask).astype(jnp.float32)
    weight = mask[..., None].astype(jnp.float32)
    return (hidden * weight).sum(axis=1) / jnp.maximum(weight.sum(axis=1), 1.0)


def policy_embeddings(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompts: Sequence[Text],
    *,
    batch_size: int = 32,
    max_prompt_length: int = 0,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Mean-pooled final hidden states [n, hidden] of the prompts (as sampling renders and cuts them).

    Prompts are sorted by length and right-padded to power-of-two lengths, so few shapes compile;
    every batch has `batch_size` rows (filler rows are dropped). With a `mesh` the rows are split
    over its data axes (multi-host: every process passes all prompts and gets all embeddings).
    """
    texts = [render_prompt(p, tokenizer) for p in prompts]
    seqs = keep_last(encode_prompts(texts, [isinstance(p, list) for p in prompts], tokenizer), max_prompt_length)
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        batch_size = -(-batch_size // shards) * shards
    graphdef, state = nnx.split(model)
    out = np.zeros((len(seqs), model.config.hidden_size), np.float32)
    order = np.argsort(-seqs.lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        sel = order[start : start + batch_size]
        ids, mask = pad_tokens(seqs.take(sel), bucket_length(int(seqs.lengths[sel].max())), "right")
        filler = batch_size - len(sel)
        ids, mask = np.pad(ids, ((0, filler), (0, 0))), np.pad(mask, ((0, filler), (0, 0)))
        if mesh is not None:
            ids, mask = (jax.device_put(a, batch_sharding(mesh, 2)) for a in (ids, mask))
        out[sel] = to_host(_mean_hidden(graphdef, state, ids, mask))[: len(sel)]
    return out


def tfidf_embeddings(texts: Sequence[str], *, dim: int = 256, seed: int = 0) -> np.ndarray:
    """TF-IDF vectors reduced to at most `dim` dimensions by TruncatedSVD (seeded)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(sublinear_tf=True).fit_transform(list(texts))
    components = min(dim, tfidf.shape[1] - 1, tfidf.shape[0] - 1)
    if components < 1:
        return tfidf.toarray().astype(np.float32)
    return TruncatedSVD(components, random_state=seed).fit_transform(tfidf).astype(np.float32)


def minilm_embeddings(texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (needs the `assets` extra)."""
    try:
        from bpo_jax.models.encoder import load_sentence_encoder
    except ImportError as e:
        raise RuntimeError(
            f"embedder 'minilm' needs the sentence encoder bpo_jax.models.encoder, which failed to import ({e}); "
            "use embedder 'policy' or 'tfidf'"
        ) from None
    return load_sentence_encoder().embed(list(texts), batch_size=batch_size)


def embed_prompts(
    prompts: Sequence[Text],
    embedder: str,
    *,
    model: CausalLM | None = None,
    tokenizer: Tokenizer | None = None,
    batch_size: int = 32,
    max_prompt_length: int = 0,
    mesh: Mesh | None = None,
    dim: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Prompt embeddings [n, D] by the named embedder (module docstring)."""
    if embedder == "policy":
        if model is None or tokenizer is None:
            raise ValueError("embedder 'policy' needs the policy model and its tokenizer")
        return policy_embeddings(
            model, tokenizer, prompts, batch_size=batch_size, max_prompt_length=max_prompt_length, mesh=mesh
        )
    if embedder == "tfidf":
        return tfidf_embeddings([prompt_text(p) for p in prompts], dim=dim, seed=seed)
    if embedder == "minilm":
        return minilm_embeddings([prompt_text(p) for p in prompts], batch_size=batch_size)
    raise ValueError(f"unknown embedder {embedder!r}; expected one of {', '.join(EMBEDDERS)}")


# -- breadth compression ------------------------------------------------------------------------------


def select_representatives(embeddings: np.ndarray, num_keep: int, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(kept row indices ascending, cluster label of every row): the row nearest each k-means
    centroid of the L2-normalized embeddings. num_keep >= rows keeps every row (labels = row)."""
    from sklearn.cluster import KMeans

    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [n, D] array; got shape {x.shape}")
    if num_keep < 1:
        raise ValueError(f"num_keep must be >= 1; got {num_keep}")
    n = x.shape[0]
    if num_keep >= n:
        return np.arange(n), np.arange(n)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm > 0, norm, 1.0)
    km = KMeans(n_clusters=num_keep, n_init=3, random_state=seed).fit(x)
    labels = km.labels_.astype(np.int64)
    distance = np.linalg.norm(x - km.cluster_centers_[labels], axis=1)
    order = np.lexsort((np.arange(n), distance, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    return np.sort(order[first]), labels


def breadth_compress(
    records: Sequence[PromptRecord],
    num_keep: int,
    embed: Callable[[list[Text]], np.ndarray],
    *,
    seed: int = 0,
) -> tuple[list[PromptRecord], dict[str, Any]]:
    """Keep `num_keep` representative unique prompts (first record of each), in input order.

    `embed(prompts) -> [n, D]` embeds the unique prompts; it is not called when nothing would be
    dropped. Returns (kept records, report with breadth before/after and cluster sizes).
    """
    first: dict[str, int] = {}
    for i, r in enumerate(records):
        first.setdefault(prompt_key(r.prompt), i)
    unique = list(first.values())
    report: dict[str, Any] = {"records_in": len(records), "breadth_before": len(unique), "num_keep": num_keep}
    if num_keep <= 0 or num_keep >= len(unique):
        kept = [records[i] for i in unique]
        return kept, {**report, "breadth_after": len(kept), "cluster_sizes": None}
    embeddings = np.asarray(embed([records[i].prompt for i in unique]))
    if embeddings.shape[0] != len(unique):
        raise ValueError(f"the embedder returned {embeddings.shape[0]} rows for {len(unique)} prompts")
    chosen, labels = select_representatives(embeddings, num_keep, seed=seed)
    sizes = np.bincount(labels)
    kept = [records[unique[i]] for i in chosen]
    report.update(
        breadth_after=len(kept),
        cluster_sizes={"min": int(sizes.min()), "mean": float(sizes.mean()), "max": int(sizes.max())},
    )
    return kept, report


# -- uniform balancing ----------------------------------------------------------------------------------


def margin_ranked_pairs(
    rewards: Sequence[float], k: int, max_uses: int | None = None, first: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """Up to k (chosen, rejected) index pairs of one prompt by descending reward margin, each
    response in at most `max_uses` pairs (default m - 1). `first`, when given, is taken before
    the margin ranking (e.g. the prompt's sweet-spot pair) and counts towards both limits."""
    r = np.asarray(rewards, np.float64)
    m = r.size
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    cap = m - 1 if max_uses is None else max_uses
    if cap < 1:
        raise ValueError(f"max_uses must be >= 1; got {max_uses}")
    i, j = np.nonzero(r[:, None] > r[None, :])
    order = np.lexsort((j, i, -(r[i] - r[j])))
    uses = np.zeros(m, np.int64)
    out: list[tuple[int, int]] = []
    ranked = list(zip(i[order].tolist(), j[order].tolist()))
    if first is not None:
        first = (int(first[0]), int(first[1]))
        if not (0 <= first[0] < m and 0 <= first[1] < m and first[0] != first[1]):
            raise ValueError(f"first pair {first} is not two distinct responses of {m}")
        ranked = [first] + [pair for pair in ranked if pair != first]
    for a, b in ranked:
        if uses[a] < cap and uses[b] < cap:
            out.append((a, b))
            uses[a] += 1
            uses[b] += 1
            if len(out) == k:
                break
    return out


def uniform_balance(
    groups: Sequence[Mapping[str, Any]],
    k: int,
    *,
    max_uses: int | None = None,
    first_pairs: Sequence[tuple[int, int] | None] | None = None,
) -> tuple[list[dict], dict[str, Any]]:
    """Scored groups {id, prompt, responses, rewards} -> k pairs per prompt (module docstring).

    first_pairs[i], when not None, is group i's first pair (margin_ranked_pairs' `first`).
    Pair records {id, prompt, chosen, rejected, meta}; the id is "<group id>/<chosen>-<rejected>".
    """
    if first_pairs is not None and len(first_pairs) != len(groups):
        raise ValueError(f"first_pairs has {len(first_pairs)} entries for {len(groups)} groups")
    pairs: list[dict] = []
    short = 0
    for row, g in enumerate(groups):
        rewards = g["rewards"]
        chosen = margin_ranked_pairs(rewards, k, max_uses, None if first_pairs is None else first_pairs[row])
        short += len(chosen) < k
        gid = g.get("id", row)
        for c, rej in chosen:
            pairs.append({
                "id": f"{gid}/{c}-{rej}",
                "prompt": g["prompt"],
                "chosen": g["responses"][c],
                "rejected": g["responses"][rej],
                "meta": {
                    "strategy": "uniform", "prompt_id": gid, "chosen_index": c, "rejected_index": rej,
                    "chosen_reward": float(rewards[c]), "rejected_reward": float(rewards[rej]),
                    "margin": float(rewards[c] - rewards[rej]), "n": len(rewards),
                },
            })
    report = {"k": k, "max_uses": max_uses, "prompts_in": len(groups), "pairs_out": len(pairs), "prompts_short_of_k": short}
    return pairs, report
