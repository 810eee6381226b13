"""peft's config for each litpeft method's shipped config: what scripts/quality.py's peft side trains."""

from __future__ import annotations

from typing import Any

from bench.config import SMOLLM2


def peft_counterpart(method: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """peft's config class and arguments for litpeft's ``method`` with init ``args`` (None: peft lacks it).

    P-tuning v2 is peft's prefix tuning without the projection (peft has no separate name for it).
    """
    from litpeft.models import resolve_spec

    if method in ("lora", "dora"):
        return "LoraConfig", {
            "r": args["r"],
            "lora_alpha": args["alpha"],
            "lora_dropout": args["dropout"],
            "target_modules": args["target_modules"],
            "use_rslora": args["use_rslora"],
            "use_dora": args["use_dora"],
        }
    if method == "prompt_tuning":
        kw: dict[str, Any] = {"num_virtual_tokens": args["num_virtual_tokens"]}
        if args["init"] == "text":
            kw.update(
                prompt_tuning_init="TEXT",
                prompt_tuning_init_text=args["init_text"],
                tokenizer_name_or_path=str(resolve_spec(SMOLLM2)),
            )
        return "PromptTuningConfig", kw
    if method == "p_tuning":
        if args.get("placement", "prefix") != "prefix":
            return None
        return "PromptEncoderConfig", {
            "num_virtual_tokens": args["num_virtual_tokens"],
            "encoder_reparameterization_type": args["encoder"].upper(),
            "encoder_hidden_size": args["encoder_hidden_size"],
            "encoder_num_layers": args["encoder_num_layers"],
            "encoder_dropout": args["encoder_dropout"],
        }
    if method in ("prefix_tuning", "p_tuning_v2"):
        kw = {
            "num_virtual_tokens": args["num_virtual_tokens"],
            "prefix_projection": args["prefix_projection"],
        }
        if args["prefix_projection"] and args.get("encoder_hidden_size"):
            kw["encoder_hidden_size"] = args["encoder_hidden_size"]
        return "PrefixTuningConfig", kw
    if method == "ia3":
        from litpeft.methods import IA3

        resolved = IA3(**args)  # null targets: litpeft's defaults, named explicitly for peft
        return "IA3Config", {
            "target_modules": resolved.targets(),
            "feedforward_modules": resolved.feedforward(),
        }
    if method == "ln_tuning":
        if args["target_modules"] is None:  # litpeft's default, every norm: SmolLM2's (Llama) by name
            return "LNTuningConfig", {
                "target_modules": ["input_layernorm", "post_attention_layernorm", "norm"]
            }
        return "LNTuningConfig", {"target_modules": args["target_modules"]}
    if method == "vera":
        return "VeraConfig", {
            "r": args["r"],
            "target_modules": args["target_modules"],
            "projection_prng_key": args["projection_prng_key"],
            "vera_dropout": args["dropout"],
            "d_initial": args["d_initial"],
        }
    if method == "loha":
        return "LoHaConfig", {
            k: args[k] for k in ("r", "alpha", "rank_dropout", "module_dropout", "target_modules")
        }
    if method == "lokr":
        return "LoKrConfig", dict(args)  # the same field names
    if method == "adalora":
        return "AdaLoraConfig", {
            "init_r": args["init_r"],
            "target_r": args["target_r"],
            "lora_alpha": args["alpha"],
            "lora_dropout": args["dropout"],
            "target_modules": args["target_modules"],
            "tinit": args["tinit"],
            "tfinal": args["tfinal"],
            "deltaT": args["delta_t"],
            "beta1": args["beta1"],
            "beta2": args["beta2"],
            "orth_reg_weight": args["orth_reg_weight"],
            # null: the run's steps (run_peft sets them); peft's config wants a valid schedule here already
            "total_step": args["total_step"] or args["tinit"] + args["tfinal"] + 1,
        }
    if method == "oft":
        return "OFTConfig", {
            key: args[key]
            for key in (
                "oft_block_size",
                "r",
                "target_modules",
                "module_dropout",
                "coft",
                "eps",
                "block_share",
                "use_cayley_neumann",
                "num_cayley_neumann_terms",
                "bias",
            )
        }
    if method == "llama_adapter":
        return "AdaptionPromptConfig", {
            "adapter_len": args["adapter_len"],
            "adapter_layers": args["adapter_layers"],
        }
    return None
