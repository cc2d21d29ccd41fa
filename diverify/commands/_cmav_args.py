"""Options shared by ``diverify bounds``, ``certify`` and ``radius``: model, prompt, positions, norm, method."""

from __future__ import annotations

import argparse

from diverify.errors import DiverifyError

METHOD_HELP = ("bound method: ibp, forward, zonotope, crown-ibp, crown-forward, crown-zonotope, crown (default) "
               "or alpha-crown "
               "(auto_LiRPA's names IBP, CROWN, CROWN-IBP, alpha-CROWN are accepted)")


def add_prompt_options(parser: argparse.ArgumentParser, positions_required: bool = False) -> None:
    parser.add_argument("--model", default="minilm", metavar="NAME|DIR",
                        help="'minilm' (all-MiniLM-L6-v2, the default) or a Hugging Face checkpoint directory")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt to certify")
    src.add_argument("--ids", metavar="ID,ID,...", help="the prompt as token ids (bypasses the tokenizer)")
    parser.add_argument("--positions", metavar="P[,Q]",
                        help="token positions whose word embeddings are perturbed (0 = first token, e.g. [CLS])")
    parser.add_argument("--method", default="crown", help=METHOD_HELP)
    parser.add_argument("--layers", type=int, metavar="N", help="truncate the encoder to its first N layers")
    parser.add_argument("--json", action="store_true", help="print one JSON object and nothing else")


#: The bound engine's arithmetics (``diverify.bounds.api.PRECISIONS``, repeated here so that building the
#: parsers does not import JAX).
PRECISIONS = ("float32", "float64", "mixed")


def add_precision_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="arithmetic of the bound computation (default float32). float64 is much tighter at "
                             "small eps, where float32's rounding, padded for soundness, dominates the width (MiniLM, "
                             "1 layer, 1e-5: 1.03x the true range vs 1.95x); it bounds the model in exact "
                             "arithmetic, up to the model's own float32 rounding, and is 2-7x slower on CPU. mixed: "
                             "float64 with the zonotope's error coefficients in float32 (their rounding bounded): less "
                             "memory, but looser through long contractions (MiniLM, 6 layers, 1e-5: 11.6x vs 3.4x)")


def add_symbols_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", type=int, default=None, metavar="N",
                        help="error symbols the zonotope methods keep at each order reduction (default 12288): more is "
                             "tighter and costs time and memory (the full MiniLM at eps 1e-5, float64: 3.4x the true "
                             "range with 12288, 1.2x with 16384 at ~12 GB; the digits UNet's 50-step reach at r 1e-5, "
                             "mixed, 2 CPU cores: 1.08x the attack with 12288 at 2.7 s a step, 1.14x with 4096 at 2.1 s, "
                             "a failed bound at step 46 with 2048)")


#: ``--refine``'s choices: the engine's ``REFINE_SCOPES``, spelled out so that ``--help`` needs no engine import.
REFINE_CHOICES = ["none", "normalisers", "attention", "costliest", "all"]


def add_refine_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--refine`` (default normalisers), with the text encoders' help unless ``help`` is given."""
    parser.add_argument("--refine", default="normalisers", choices=REFINE_CHOICES,
                        help=help or "which intervals of the zonotope methods a backward CROWN pass tightens once symbols "
                             "have been boxed: none (the zonotope alone), normalisers (LayerNorm variances, softmax "
                             "denominators; the default) "
                             "or attention (also queries, keys, attention weights, values and the softmax's exp "
                             "inputs; MiniLM, 3 layers, float64, 1e-4: 8.2x the true range instead of 21.7x, 83 s "
                             "instead of 28); all: every relaxation's input (the FFN's GELU inputs too), the tightest "
                             "and slowest (3 layers: 1.8x in 233 s; the full MiniLM at 1e-4, refused otherwise: 2.6x "
                             "in 609 s, 22 GB); costliest: those of all, but of each value only the 1024 elements "
                             "whose relaxations lose most (3 layers: 3.2x in 90 s; one layer at 1e-3: as tight as "
                             "all in a third of the time)")


def check_symbols(symbols) -> int | None:
    """``--symbols`` checked before the model loads, by the engine's own rule."""
    from diverify.bounds.api import check_symbols as check

    return check(symbols, "--symbols")


def add_ball_options(parser: argparse.ArgumentParser, eps_required: bool = True) -> None:
    parser.add_argument("--norm", default="inf", choices=["inf", "2", "1"], help="l_p norm of the ball (default inf)")
    if eps_required:
        parser.add_argument("--eps", type=float, metavar="E", help="radius of the ball on each perturbed word embedding")


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise DiverifyError(f"{option}: expected comma-separated integers, got {text!r}") from None


def norm_value(text: str) -> float:
    return float("inf") if text == "inf" else float(text)


def load(args):
    """The encoder (possibly truncated) and the tokenised prompt."""
    from diverify import cmav
    from diverify.models import load_text_encoder

    enc = load_text_encoder(args.model)
    if args.layers is not None:
        if not 1 <= args.layers <= enc.num_layers:
            raise DiverifyError(f"--layers must be between 1 and {enc.num_layers}")
        enc = enc.with_layers(args.layers)
    ids = parse_int_list(args.ids, "--ids") if args.ids else None
    prompt = cmav.make_prompt(enc, text=args.prompt, ids=ids)
    return enc, prompt


def positions(args, prompt, default_last_word: bool = True) -> list[int]:
    from diverify import cmav

    if getattr(args, "words", None):
        return cmav.positions_of_words(args._encoder, prompt, args.words)
    if args.positions:
        return cmav.check_positions(prompt, parse_int_list(args.positions, "--positions"))
    if default_last_word:
        # The last token before the final special token ([SEP] / EOS) — the prompt's last word.
        return [max(1, prompt.ids.shape[1] - 2)]
    raise DiverifyError("choose the perturbed positions with --positions")


def check_eps(eps) -> float:
    if eps is None:
        raise DiverifyError("--eps is required")
    if not eps >= 0:
        raise DiverifyError(f"--eps must be >= 0, got {eps}")
    return float(eps)
