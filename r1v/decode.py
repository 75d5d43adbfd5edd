"""The decode step — one new token for every sequence, the phase that decides a GPU step's time —
on a static KV cache of ONE shape for the whole run, compiled once and counted.

The cache is the run's: N sequences x (the longest prompt of the data + the completion), made
once, so the compiled step (on CUDA, one CUDA graph) is replayed by every later step and every
held-out evaluation. Only the decode step is compiled: the prefill's shapes change with every
batch, so it stays eager. The model's forward is dispatched here (an instance attribute, as
accelerate's hooks do): one-token calls on this cache go to the compiled step, the rest to the
eager forward. Compiles and graph breaks are counted, never silent: a recompile is warned with
the reason torch gives (past torch's recompile limit a frame runs eager)."""

import functools

import torch
from tqdm import tqdm

from r1v import rows
from r1v.cli import UserError
from r1v.model import base_of

# On CUDA, inductor's "reduce-overhead": the compiled step is captured as a CUDA graph and
# replayed, one launch a step instead of thousands (REFERENCE 10).
CUDA_MODE = "reduce-overhead"
NOT_COMPILED = {"decode_compiles": 0, "decode_graph_breaks": 0}  # what a run without it logs


def check_backend(compile, backend, device):
    """A backend that cannot run on `device` is a one-line error before any model loads."""
    if compile and backend == "cudagraphs" and device.type != "cuda":
        raise UserError("--compile_backend cudagraphs needs a CUDA GPU; on a CPU use inductor, "
                        "aot_eager or eager")


def for_eval(model, processor, view, prompt_rows, batch_size, new_tokens, backend):
    """eval.py's --compile_decode: one static KV cache for every batch (`batch_size` prompts x
    the longest prompt + `new_tokens`) and the decode step compiled once. `prompt_rows(view)`:
    each row's question and visual tokens (eval.load_items)."""
    longest = rows.check_prompt_lengths(processor.tokenizer, prompt_rows(view), "--dataset", view,
                                        float("inf"))
    decoder = Decoder(model, batch_size, longest + new_tokens, True, backend)
    tqdm.write(decoder.describe())
    return decoder


def graph_breaks():
    """Graph breaks torch has met in this process so far."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def cache_bytes(config, batch_size, length, dtype):
    """A static KV cache's size: keys and values of every layer for `length` tokens each."""
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
    return batch_size * length * per_token * torch.finfo(dtype).bits // 8


class Decoder:
    """The run's static KV cache for `batch_size` sequences of up to `cache_length` tokens and,
    with `compile`, the model's decode step compiled by torch.compile's `backend`."""

    def __init__(self, model, batch_size, cache_length, compile=False, backend="inductor"):
        self.base, self.batch_size, self.cache_length = base_of(model), batch_size, cache_length
        self.dtype = model.get_input_embeddings().weight.dtype  # the KV cache's (compute dtype)
        self.compiled, self.backend, self.compiles = compile, backend, 0
        self.cache, self.adapter_copies = None, {}  # both made once, at stable addresses
        self._prompt = self._seen = 0  # prompt tokens of the batch; tokens seen on the cache
        self._frame, self._breaks = None, graph_breaks()
        if compile:
            self._install()

    def describe(self):
        size = cache_bytes(self.base.config, self.batch_size, self.cache_length, self.dtype)
        how = f"compiled once ({self.backend})" if self.compiled else "eager (--compile_decode)"
        return (f"decode: a static KV cache of {self.batch_size} sequences x "
                f"{self.cache_length} tokens ({size / 2**30:.2f} GiB), the decode step {how}")

    def cache_for(self, batch_size, prompt_length, new_tokens):
        """The run's cache, emptied, for `batch_size` prompts of `prompt_length` tokens (padded)
        and `new_tokens`; a batch or length it cannot hold gets a new, larger cache (the
        compiled step then compiles again: warned)."""
        from transformers import StaticCache

        length, self._prompt, self._seen = prompt_length + new_tokens, prompt_length, 0
        if self.cache is None or batch_size != self.batch_size or length > self.cache_length:
            if self.cache is not None:  # the old one goes before the new one is made
                self.cache = None
                tqdm.write(f"warning: the decode step's cache is made again for {batch_size} "
                           f"sequences x {max(length, self.cache_length)} tokens (it held "
                           f"{self.batch_size} x {self.cache_length}, sized from the rows at "
                           "the start)")
            self.batch_size, self.cache_length = batch_size, max(length, self.cache_length)
            text = self.base.config.get_text_config()
            self.cache = StaticCache(config=text, max_cache_len=self.cache_length)
            num_heads, head_dim = self.base._get_static_cache_init_shape()
            self.cache.early_initialization(batch_size, num_heads, head_dim, self.dtype,
                                            self.base.device)
        else:
            self.cache.reset()  # masked positions must hold finite numbers (0 * NaN is NaN)
        return self.cache

    def stats(self):
        """What metrics.jsonl logs every step."""
        return {"decode_compiles": self.compiles,
                "decode_graph_breaks": graph_breaks() - self._breaks if self.compiles else 0}

    # --- compiling --------------------------------------------------------------------------

    def _install(self):
        # One compiled decode step a process: what an earlier Decoder compiled (another model's,
        # a test's) would otherwise be reused or count against torch's recompile limit.
        torch._dynamo.reset()
        eager = self.base.forward
        compiled = torch.compile(eager, backend=self._counted(), dynamic=False)

        @functools.wraps(eager)  # generate() reads the forward's signature
        def forward(*args, **kwargs):
            ids, on_cache = kwargs.get("input_ids"), kwargs.get("past_key_values") is self.cache
            # after the whole prompt: a prefill's last chunk can be one token too
            decoding = (self.compiled and on_cache and self.cache is not None
                        and ids is not None and ids.shape[1] == 1 and self._seen >= self._prompt)
            self._seen += ids.shape[1] if on_cache and ids is not None else 0
            if not decoding:
                return eager(*args, **kwargs)
            if self.compiles:
                return compiled(*args, **kwargs)
            try:  # the first call compiles: a compiler that fails leaves the run eager, said
                return compiled(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - any compiler error (no C++ compiler...)
                if self.compiles:  # compiled, then failed running: the model's own error
                    raise
                self.compiled = False
                e = getattr(e, "inner_exception", None) or e  # dynamo's wrapper: the cause
                first = (str(e).strip().splitlines() or [""])[0][:200]
                tqdm.write(f"warning: the decode step could not be compiled ({type(e).__name__}: "
                           f"{first}); it runs eagerly (--no-compile_decode: no attempt)")
                return eager(*args, **kwargs)
        self.base.forward = forward
        self._code = getattr(eager, "__func__", eager).__code__

    def _counted(self):
        """The backend, counting the compiles of the decode step's own frame (a graph break
        adds graphs of other frames: counted as breaks)."""
        backend = self.backend
        if backend == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            mode = CUDA_MODE if self.base.device.type == "cuda" else "default"
            backend = functools.partial(compile_fx, config_patches=list_mode_options(mode))
        else:
            backend = torch._dynamo.lookup_backend(backend)

        def count(graph, example_inputs):
            frame = torch._guards.CompileContext.current_compile_id().frame_id
            self._frame = frame if self._frame is None else self._frame
            compiled = backend(graph, example_inputs)
            if frame == self._frame:  # counted once compiled
                self.compiles += 1
                if self.compiles > 1:
                    self._warn_recompile()
            return compiled
        return count

    def _warn_recompile(self):
        from torch._dynamo.utils import guard_failures

        reasons = guard_failures.get(self._code) or ["torch gave no reason"]
        tqdm.write(f"warning: the decode step compiled again (compile {self.compiles}): "
                   f"{str(reasons[-1]).strip().splitlines()[0]}; after "
                   f"{torch._dynamo.config.recompile_limit} compiles torch runs it eagerly")
