"""How the `qadapt` command line is read: the arguments and options several commands share, and
`--resume`'s optional value. Declarations only; the commands are qadapt.cli's."""

from __future__ import annotations

from pathlib import Path

import typer

RecipeArg = typer.Argument(..., help="Recipe YAML file, e.g. recipes/quickstart.yaml.", show_default=False)
OverridesArg = typer.Argument(None, help="Overrides as section.key=value, e.g. train.lr=1e-4 model.quant=int8.")
TargetArg = typer.Argument(..., help="A run directory, or a bare model: smollm2-135m, a hub id, a folder.",
                           show_default=False)
RunArg = typer.Argument(..., help="A finished run directory (it has recipe.yaml and adapter/).", show_default=False)
QuantOption = typer.Option("nf4", help="How a bare model is loaded: nf4, fp4, int8 or none (a run: as trained).")
TemplateOption = typer.Option(None, help="Prompt template, alpaca or chat (default: the run's, else alpaca).")
MaxNewTokensOption = typer.Option(256, help="Longest answer in tokens.")
DTypeOption = typer.Option(None, help="Override the compute dtype (auto, bf16, fp16, fp32); fp32 makes greedy "
                                      "answers independent of the batch.")
TemperatureOption = typer.Option(0.0, help="Sample at this temperature; 0: greedy (the default).")
TopPOption = typer.Option(1.0, "--top-p", help="Sampling: keep the most likely tokens whose probabilities sum to P.")
TopKOption = typer.Option(0, "--top-k", help="Sampling: keep the K most likely tokens (0: all).")
SeedOption = typer.Option(0, help="Sampling: the seed (the same seed and prompt give the same answer).")
MergeBaseOption = typer.Option("dequantized", help="Fold into the exact de-quantized weights the adapter was "
                                                   "trained against (dequantized) or the checkpoint's own (original).")
ResumeOption = typer.Option(
    None, "--resume", metavar="[CHECKPOINT]",
    help="Continue from the latest complete checkpoint in output_dir (or the checkpoint folder given); the run "
         "continues as if never interrupted.")
EvalDataOption = typer.Option(None, "--data", help="A set: GSM8K .jsonl, LLM-Adapters .json, a hub id or "
                              "builtin:arithmetic; for a token-classification run a CoNLL file. Repeat for more "
                              "sets; PATH@N scores a set's first N.")
CalculatorOption = typer.Option(False, "--calculator", help="Write the true result after each sum a rationale "
                                "writes ('98 - 93 =' gets ' 5'); not the paper's protocol, so scored apart (default "
                                "folder RUN/eval-calculator).")
GridOption = typer.Option(
    None, "--grid", metavar="KEY=V1,V2",
    help="Values to try for a recipe key; repeat for more keys (the runs are the cross product). A value may be a "
         "mapping setting several keys of a section: 'adapter={kind: lora},{kind: series}'.")
KeptResultsOption = typer.Option(
    None, help="Keep each finished run's result files (recipe, summary, log, scores; no weights) in this folder, "
               "e.g. docs/results/NAME to commit, and count a run kept there by the same recipe as done: the table "
               "grows across sessions and machines.")
ExportFormatOption = typer.Option(..., "--format", help="peft (the adapter alone), gguf (merged, for llama.cpp), "
                                  "gguf-lora (a folder: llama.cpp's adapter file and its base) or ollama (a folder: "
                                  "the GGUF and a Modelfile).", show_default=False)
GgufTypeOption = typer.Option("f16", "--type", help="GGUF weights type: f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, "
                              "or a K-quant (q4_k_m, q5_k_m, q6_k, ...: needs the llamacpp extra).")


def with_resume_value(args: list[str]) -> list[str]:
    """`--resume` may stand alone (the latest checkpoint) or name a checkpoint; typer options cannot
    have an optional value, so a bare one is spelled `--resume=latest` before typer parses it.

    The word after `--resume` is its value unless it is an option, an override (`key=value`) or a recipe.
    """
    args = list(args)
    if not args or args[0] != "train":  # `qadapt eval --resume` is a plain flag
        return args
    for index, arg in enumerate(args):
        if arg != "--resume":
            continue
        following = args[index + 1] if index + 1 < len(args) else None
        if following is None or following.startswith("-") or "=" in following or following.endswith((".yaml", ".yml")):
            args[index] = "--resume=latest"
    return args


# --- train ---
AllowRecipeChangesOption = typer.Option(False, help="Resume even though the recipe or data changed.")
OverwriteOption = typer.Option(False, help="Replace the run already in output_dir.")
SkipEvalOption = typer.Option(False, help="Do not score the recipe's eval sets at the end (score later with qadapt "
                                          "eval RUN --resume).")
# --- data, plan ---
ShowOption = typer.Option(3, help="How many training examples to print.")
JsonOption = typer.Option(False, "--json", help="Print the examples' segments and the counts as JSON.")
GpuMemoryOption = typer.Option(24.0, help="The GPU's memory in GiB.")
FsdpGpusOption = typer.Option(1, help="Plan for FSDP sharding the base over this many GPUs (per GPU).")
# --- sweep ---
SweepOutOption = typer.Option(None, help="The sweep's folder (default: runs/sweep-RECIPE).")
BaselineOption = typer.Option(False, help="Also score the untrained base on the eval sets (DIR/base).")
EvalDTypeOption = typer.Option("fp32", help="Compute dtype when scoring (fp32: answers independent of the batch).")
# --- eval ---
LimitOption = typer.Option(None, help="Only the first N problems of each set.")
EvalBatchOption = typer.Option(64, help="Problems decoded together (lower it if memory runs short).")
StrictOption = typer.Option(False, help="Read only the number (or letter) after 'The answer is'.")
EvalOutOption = typer.Option(None, help="Output folder (default: RUN/eval, or runs/eval/MODEL-QUANT).")
EvalResumeOption = typer.Option(False, "--resume", help="Keep the sets already scored in the output folder with the "
                                "same settings; score only the others.")
# --- generate, chat ---
PromptArg = typer.Argument(..., help="The instruction, as a user would write it.", show_default=False)
SamplesOption = typer.Option(1, help="Sampling: this many answers (each printed under its number).")
HistoryOption = typer.Option(False, "--history", help="Keep the conversation: each answer sees the turns before "
                             "it, rendered by the run's chat template as in training.")
# --- rationales ---
TeacherOption = typer.Option(..., "--teacher", help="A run, a merged folder or a bare model (as for eval), or an "
                             "OpenAI-compatible endpoint: http://127.0.0.1:8080/v1.", show_default=False)
ProblemsOption = typer.Option(..., "--data", help="Problems with answers: builtin:arithmetic, a GSM8K .jsonl, an "
                              "LLM-Adapters .json. Repeat for more sets.", show_default=False)
RationalesOutOption = typer.Option(..., "--out", help="The rationales (LLM-Adapters JSON); beside it "
                                   "OUT.samples.jsonl (every sample, for resuming) and OUT.stats.json.",
                                   show_default=False)
TeacherSamplesOption = typer.Option(8, help="Solutions sampled per problem (K).")
TeacherTemperatureOption = typer.Option(0.7, help="Sampling temperature.")
SplitOption = typer.Option("train", help="Split of a built-in or hub set.")
TeacherBatchOption = typer.Option(64, help="A local teacher: rows (samples) decoded together.")
EndpointModelOption = typer.Option(None, help="An endpoint: the model to ask (default: the first it lists).")
ApiKeyEnvOption = typer.Option(None, help="An endpoint: the environment variable holding its API key (read, sent, "
                               "never written).")
ConcurrencyOption = typer.Option(4, help="An endpoint: requests in flight at once.")
TimeoutOption = typer.Option(120.0, help="An endpoint: seconds to wait for one answer (retried).")
SystemOption = typer.Option(None, help="An endpoint: the system prompt (default: solve step by step and end with "
                            "'The answer is N.'; '' for none).")
PairsOption = typer.Option(False, "--pairs", help="Write preference pairs instead (JSONL: prompt, chosen, "
                          "rejected): per problem, a right sample and a wrong one, for task: preference.")
# --- report ---
RunsArg = typer.Argument(..., help="Run directories to compare.", show_default=False)
ReportOutOption = typer.Option(None, help="Also write the markdown table to this file.")
StudioRunsOption = typer.Option(Path("runs"), "--runs", help="The folder whose run directories the studio shows and "
                                "where it starts new ones (made when missing).")
StudioRecipesOption = typer.Option(Path("recipes"), "--recipes", help="The folder of recipes a new run can start "
                                   "from (beside the recipes of the runs themselves).")
StudioHostOption = typer.Option("127.0.0.1", help="The address to listen on: 127.0.0.1 (this machine only); any "
                                "other needs the token the studio prints.")
StudioPortOption = typer.Option(7870, help="The port to listen on (0: any free one).")
PlotOption = typer.Option(None, help="Draw loss curves and accuracies to this PNG (needs matplotlib).")
JsonOutOption = typer.Option(None, "--json", help="Also write the figures as JSON to this file.")
AgainstOption = typer.Option(None, "--against", help="Pair every run with this one, problem by problem (McNemar); "
                             "a run's name is its folder's. Repeatable.")
# --- merge, export, import-peft ---
MergeOutOption = typer.Option(..., help="The Hugging Face folder to write (must not exist yet).", show_default=False)
MergeDTypeOption = typer.Option("auto", help="Weights dtype: auto (the checkpoint's), bf16, fp16 or fp32.")
ExportOutOption = typer.Option(..., help="Folder (peft, gguf-lora, ollama) or .gguf file to write.",
                               show_default=False)
PeftDirArg = typer.Argument(..., help="A PEFT LoRA / DoRA adapter folder.", show_default=False)
NewRunOption = typer.Option(..., help="The run directory to create.", show_default=False)
PeftBaseOption = typer.Option(None, help="Base model (default: the adapter's base_model_name_or_path).")
RunQuantOption = typer.Option("nf4", help="How the base is loaded when the run is used: nf4, fp4, int8 or none.")
RunTemplateOption = typer.Option("alpaca", help="Prompt template the adapter was trained with: alpaca, llm-adapters "
                                                "or chat.")
