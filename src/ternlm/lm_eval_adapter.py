"""lm-evaluation-harness model "ternlm", so `lm_eval --model ternlm --model_args path=...` runs its benchmarks on
the ternlm engine. lm-eval finds models only by import: call `register()` first, or run
`python -m ternlm.lm_eval_adapter [lm_eval arguments]`, which registers and then runs lm-eval's own command line.
Importing this module does not import lm-eval."""

from __future__ import annotations

import sys
from typing import Any

from ternlm import evaluate

_registered: dict[str, type] = {}


def _parse_int(value: Any) -> int | None:
    return None if value in (None, "", "None") else int(value)


def register() -> type:
    """Register (once) and return the lm-eval model class "ternlm"; ImportError when lm-eval is not installed."""
    if "ternlm" in _registered:
        return _registered["ternlm"]
    import lm_eval.models  # noqa: F401  fills lm-eval's own registry first: it only does so when it is empty
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class TernlmLM(LM):
        """lm-eval LM over a ternlm Model: model_args path, threads, ctx, head, weights."""

        def __init__(self, path: str | None = None, threads: int | str | None = None, ctx: int | str | None = None,
                     head: str = "q8_0", weights: str = "i2", **_: Any) -> None:
            super().__init__()
            from ternlm.api import load

            self.model = load(path or None, threads=_parse_int(threads), n_ctx=_parse_int(ctx),
                              head=head, weights=weights)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return [evaluate.loglikelihood(self.model, *req.args[:2]) for req in requests]

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            return [evaluate.rolling_loglikelihood(self.model, req.args[0]) for req in requests]

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            return [self._generate(*req.args[:2]) for req in requests]

        def _generate(self, context: str, gen_kwargs: dict) -> str:
            """Greedy unless do_sample; `until` strings stop generation and are cut from the reply (as lm-eval)."""
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            max_tokens = int(kwargs.get("max_gen_toks", 256))
            prompt = self.model.tokenizer.encode(context, add_bos=True)[-max(1, self.model.n_ctx - max_tokens):]
            text = "".join(e.text for e in self.model.generate(prompt, max_tokens, temperature=temperature,
                                                                top_k=0, top_p=1.0, min_p=0.0, stop=until))
            for stop in until:
                text = text.split(stop)[0]
            return text

    _registered["ternlm"] = register_model("ternlm")(TernlmLM)
    return _registered["ternlm"]


def main(argv: list[str] | None = None) -> int:
    """Register "ternlm" and hand the arguments to lm-eval's command line."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
