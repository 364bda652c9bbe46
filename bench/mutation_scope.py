"""What the mutation check (bench/mutation.py) mutates, which tests may kill each group's mutants, and the
reviewed survivors: those that cannot change behaviour (:data:`EQUIVALENT`) and those only a CUDA run tells
apart (:data:`GPU_ONLY`)."""

from __future__ import annotations

from dataclasses import dataclass

# What is mutated: the functions that do the work in the training loop (the step: caption dropout,
# loss, optimizer and EMA; the weights exported) and the helpers it calls for the timestep sampling
# (flow) and the learning-rate schedule and EMA (optim); sampling; the cache lookup and the
# fingerprints; recipe validation of values and links.  Each group runs only the tests that matter
# for it: mutmut runs, for each mutant, the group's tests that reached the mutated function, the
# fastest first, until one fails; a mutant that survives runs them all, so a slow test costs once
# per survivor.  Tests of several seconds that mostly repeat what faster ones check (the CLI run in
# a subprocess, concurrency) are left out of the selections.
@dataclass(frozen=True)
class Group:
    """Functions mutated together (mutmut name globs), their modules, and the pytest arguments
    that select the tests that may kill their mutants."""

    name: str
    modules: tuple[str, ...]
    functions: tuple[str, ...]
    tests: tuple[str, ...]


_TRAIN = "fluxkiln.plugins.train."
_ENGINE = "fluxkiln.engine."
GROUPS = [
    Group("validate", ("engine/validate.py",),
          (f"{_ENGINE}validate.xǁ_Checkerǁ_check_value__*", f"{_ENGINE}validate.xǁ_Checkerǁ_check_link__*",
           f"{_ENGINE}validate.xǁ_Checkerǁ_local_file__*", f"{_ENGINE}validate.xǁ_Checkerǁ_check_node__*"),
          ("tests/test_validate.py", "tests/test_hostile_recipes.py", "tests/test_list_ports.py", "-k",
           "not validate_hostile_recipe and not run_refuses and not fuzzed")),
    Group("cache", ("engine/cache.py", "engine/fingerprint.py", "engine/plan.py"),
          (f"{_ENGINE}fingerprint.x_canonical__*", f"{_ENGINE}fingerprint.x_digest__*",
           f"{_ENGINE}fingerprint.x_identity__*", f"{_ENGINE}fingerprint.x_diff_reasons__*",
           f"{_ENGINE}fingerprint.xǁFileHasherǁfile__*", f"{_ENGINE}plan.x__literal_identity__*",
           f"{_ENGINE}cache.xǁDiskCacheǁlookup__*", f"{_ENGINE}cache.xǁDiskCacheǁ_validate__*",
           f"{_ENGINE}cache.xǁDiskCacheǁcheck__*", f"{_ENGINE}cache.xǁMemoryCacheǁhit__*"),
          ("tests/test_cache.py", "tests/test_cache_store.py", "-k",
           "not cache_command and not explain_prints and not force_node and not file_where_a_cache_folder "
           "and not budget_prunes and not unknown_port_type and not read_only_cache and not cache_list_shows")),
    Group("sample", ("plugins/flux/sample.py",),
          ("fluxkiln.plugins.flux.sample.x_sample__*", "fluxkiln.plugins.flux.sample.x_make_jobs__*",
           "fluxkiln.plugins.flux.sample.x_scaled_adapters__*", "fluxkiln.plugins.flux.sample.x_check_variant__*",
           "fluxkiln.plugins.flux.sample.x_prompt_list__*", "fluxkiln.plugins.flux.sample.x__make__*"),
          ("tests/test_flux_sample.py", "tests/test_flux_units.py", "tests/test_params_reach_the_work.py",
           "tests/test_sample_contract.py", "-k",
           "not every_aspect_ratio and (not test_two_values or (sample and not train_lora))")),
    Group("train", ("plugins/train/loop.py", "plugins/train/flow.py", "plugins/train/optim.py"),
          (f"{_TRAIN}loop.xǁTrainerǁexport_weights__*", f"{_TRAIN}flow.x_sample_times__*",
           f"{_TRAIN}flow.x_flux_mu__*", f"{_TRAIN}optim.x_lr_lambda__*", f"{_TRAIN}optim.xǁEMAǁupdate__*",
           f"{_TRAIN}optim.xǁEMAǁload__*"),
          ("tests/test_train_units.py", "tests/test_train_lora.py", "tests/test_params_reach_the_work.py", "-k",
           "not test_two_values or train_lora")),
    # The training step (caption dropout, loss, clipping, optimizer, EMA): every mutant that a test does
    # not kill at once costs a full set of short training runs, so it is a group of its own.
    Group("train-step", ("plugins/train/loop.py",), (f"{_TRAIN}loop.xǁTrainerǁ_step__*",),
          ("tests/test_train_lora.py", "tests/test_params_reach_the_work.py", "tests/test_train_step_contract.py",
           "-k", "train_lora or train_step_contract")),
]
MODULES = [m for g in GROUPS for m in g.modules]

# Mutations of string literals are left out: in these modules the literals are messages, whose
# wording tests pin by key words rather than letter by letter, and the few that select behaviour
# (mode names) are compared with == / in, which the operator mutations already change.
SKIPPED_OPERATORS = ("operator_string",)

# Reviewed mutants that cannot change behaviour, each with the reason.  Keyed by mutmut's name,
# which stays stable while the function is unchanged; a stale key is reported.
_LOOKUP_DROPS = "lookup() catches this ValueError and drops its message (the entry is a miss either way)"
_JOINED_HAS_EVERY_PORT = ("output_types[node] is built from the same node type's outputs and `port` was "
                          "checked to be one of them, so the default is never used")
_STEP_STRICT = "zip(batch, drop): `drop` is drawn with len(batch) values, so the lengths always match"
_STEP_WHOLE_BATCH = ("with two or more ranks each would compute the loss of the whole global batch instead of its "
                     "share, weighted by its share (0 for an idle rank), so the summed gradients and loss are the "
                     "same (to rounding); only the work per rank grows, which a test cannot time reliably")
_STEP_FOREACH = "foreach only picks clip_grad_norm_'s kernels (one fused call or a loop), not the arithmetic"
_STEP_ZEROS = ("zero-filled gradients instead of None: the next backward reaches every LoRA weight and adds into "
               "the zeros, and the gradient sync turns None into zeros anyway")
_STEP_GLOBAL_RNG = ("the dropout draws from torch's global generator instead of the run's: adapter.attach seeds it "
                    "with the run's seed and checkpoints save and restore it, so runs stay reproducible and resume "
                    "bit for bit; only which stream the draws come from differs")
_STEP_EQUIVALENT = {
    5: _STEP_GLOBAL_RNG, 7: _STEP_GLOBAL_RNG,
    8: "rand() < rate vs <= rate differs only for a draw of exactly 0.0 (probability 2**-24 per sample)",
    14: _STEP_STRICT, 17: _STEP_STRICT, 18: _STEP_STRICT,
    38: _STEP_WHOLE_BATCH, 47: _STEP_WHOLE_BATCH, 48: _STEP_WHOLE_BATCH, 51: _STEP_WHOLE_BATCH,
    49: "one process: part is range(0, len(batch)), and slicing the whole batch changes nothing",
    50: "one process: part is range(0, len(batch)), and slicing the whole batch changes nothing",
    56: "share == 1 multiplies the loss by 1.0, which leaves it and its gradient bit for bit unchanged",
    59: "share is len(part) / len(batch) <= 1, never 2",
    96: _STEP_FOREACH, 99: _STEP_FOREACH, 100: _STEP_FOREACH,
    102: _STEP_ZEROS, 103: _STEP_ZEROS,
}
EQUIVALENT: dict[str, str] = {
    f"{_ENGINE}validate.xǁ_Checkerǁ_check_link__mutmut_50": _JOINED_HAS_EVERY_PORT,
    f"{_ENGINE}validate.xǁ_Checkerǁ_check_link__mutmut_52": _JOINED_HAS_EVERY_PORT,
    **{f"{_ENGINE}cache.xǁDiskCacheǁ_validate__mutmut_{n}": _LOOKUP_DROPS for n in (5, 10, 15, 27)},
    f"{_ENGINE}fingerprint.x_canonical__mutmut_5": "ensure_ascii=None is falsy, exactly as ensure_ascii=False",
    **{f"{_TRAIN}optim.xǁEMAǁupdate__mutmut_{n}": "torch._foreach_add_ promotes a bfloat16 value into the float32 "
                                                 "average exactly as .float() does (the conversion is there for "
                                                 "CUDA's fast path, which needs one dtype)" for n in (17, 18)},
    f"{_TRAIN}optim.xǁEMAǁupdate__mutmut_16": ".float() of a float32 tensor is the tensor itself, and of any other "
                                              "dtype exactly what the original computes",
    "fluxkiln.plugins.flux.sample.x__make__mutmut_4": "only the wording of a log line",
    "fluxkiln.plugins.flux.sample.x__make__mutmut_37": "reading torch.compile's counters on CPU too: nothing is "
                                                       "compiled there (plan() compiles only on CUDA), so they do "
                                                       "not move and no line is logged",
    **{f"fluxkiln.plugins.flux.sample.x_make_jobs__mutmut_{n}": "zip(chosen, inputs): `chosen` is the prompts "
       "when there is one per input (checked just above) or built from `inputs` item by item, so the lengths "
       "always match" for n in (53, 56, 57)},
    **{f"{_TRAIN}loop.xǁTrainerǁ_step__mutmut_{n}": why for n, why in _STEP_EQUIVALENT.items()},
}

# Mutants that only a run on a CUDA GPU can tell apart (on CPU the code takes the branch where the mutated
# value does not matter), each with the test that kills it there.  Counted apart from the unexplained.
_GO_FAST_GPU = "tests/test_gpu_paths.py::test_go_fast_compiles_the_blocks_and_the_vae_and_stays_close"
_COMPILE_LOG_GPU = "tests/test_sample_contract.py::test_the_call_that_compiles_logs_its_compile_time"
GPU_ONLY: dict[str, str] = {
    **{f"fluxkiln.plugins.flux.sample.x__make__mutmut_{n}": _GO_FAST_GPU for n in (19, 21, 28, 34)},
    **{f"fluxkiln.plugins.flux.sample.x__make__mutmut_{n}": _COMPILE_LOG_GPU for n in (35, 36, 38, 60, 61)},
    f"{_TRAIN}loop.xǁTrainerǁ_step__mutmut_36": "tests/test_train_gpu.py::test_tiny_model_trains_in_bf16_on_the_gpu",
}
