"""The ``safety_check`` node: two-stage NSFW check, then drop, blur or flag what both stages call unsafe."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field

from fluxkiln.engine import ImageItem, Images, NodeError, RunContext, node

DEFAULT_CHECKER = "CompVis/stable-diffusion-safety-checker"
DEFAULT_CLASSIFIER = "Falconsai/nsfw_image_detection"
ACTIONS = {"drop": "dropped", "blur": "blurred", "flag": "flagged"}


@node("safety_check", version="1", category="images")
def safety_check(
    ctx: RunContext,
    images: Images,
    checker: Annotated[str, Field(description="Stage 1: Stable Diffusion safety checker (hub id, folder, pipeline "
                                              "folder with safety_checker/, builtin:tiny-safety) or 'none'")]
    = DEFAULT_CHECKER,
    classifier: Annotated[str, Field(description="Stage 2: NSFW image classifier for the images stage 1 flags "
                                                 "(hub id, folder, builtin:tiny-safety) or 'none'")]
    = DEFAULT_CLASSIFIER,
    policy: Annotated[Literal["drop", "blur", "flag"], Field(
        description="What happens to unsafe images: removed, blurred, or kept and marked")] = "drop",
    checker_adjustment: Annotated[float, Field(ge=-1.0, le=1.0, description="Added to every stage-1 concept score; "
                                                                           "above 0 flags more images")] = 0.0,
    classifier_threshold: Annotated[float, Field(ge=0.0, le=1.0, description="Stage-2 NSFW probability from "
                                                                            "which an image is flagged")] = 0.5,
    batch_size: Annotated[int, Field(ge=1, le=64, description="Images checked at once")] = 8,
) -> Images:
    """Check images for NSFW content; drop (default), blur or flag the unsafe ones.

    Stage 1, a CLIP-based Stable Diffusion safety checker, looks at every image;
    stage 2, an NSFW image classifier, looks again at those stage 1 flags.  An
    image is unsafe only when both flag it (with one stage set to "none", the
    other decides alone).  Every image gets ``flags["safety"]`` with the scores;
    unsafe images kept by ``blur``/``flag`` also get ``flags["nsfw"]``.  Each
    unsafe image is logged, and ``safety.json`` in the node folder lists all
    verdicts.  If every image would be dropped the node fails and says so.
    """
    use_checker, use_classifier = _on(checker), _on(classifier)
    if not (use_checker or use_classifier):
        raise NodeError("both safety stages are turned off (checker and classifier are 'none')", key="checker",
                        hint="set a checker or classifier model, or remove the safety_check node")
    items = list(images)
    verdicts: list[dict[str, Any]] = [{} for _ in items]
    total = (len(items) if use_checker else 0)
    done = 0
    stage1 = list(range(len(items)))
    if use_checker:
        stage = _load(ctx, checker, "checker")
        results = _run_batches(ctx, items, stage1, batch_size, lambda ims: _checker(stage, ims, checker_adjustment))
        for i, r in results.items():
            verdicts[i]["checker"] = r
        done = len(items)
        stage1 = [i for i in stage1 if verdicts[i]["checker"]["flagged"]]
    if use_classifier and stage1:
        total += len(stage1)
        stage = _load(ctx, classifier, "classifier")
        results = _run_batches(ctx, items, stage1, batch_size,
                               lambda ims: _classifier(stage, ims, classifier_threshold), done, total)
        for i, r in results.items():
            verdicts[i]["classifier"] = r
        stage1 = [i for i in stage1 if verdicts[i]["classifier"]["flagged"]]
    unsafe = set(stage1)
    out = _apply(ctx, items, verdicts, unsafe, policy)
    _report(ctx, items, verdicts, unsafe, policy, checker if use_checker else None,
            classifier if use_classifier else None)
    if items and not out:
        raise NodeError(f"all {len(items)} image(s) were judged unsafe and dropped, so nothing is left to pass on "
                        f"(see {ctx.node_dir() / 'safety.json'})",
                        hint='use policy = "blur" or "flag" to keep them, change the prompt or seed, or tune '
                             "checker_adjustment / classifier_threshold")
    return out


def _on(ref: str) -> bool:
    return ref.strip().lower() not in ("none", "")


def _load(ctx: RunContext, ref: str, kind: str) -> Any:
    from fluxkiln.plugins.caption.modelref import module_bytes, release_modules, resolve_ref

    from .models import load_checker, load_classifier

    what = "safety checker" if kind == "checker" else "NSFW classifier"
    folder = resolve_ref(ctx, ref, key=kind, what=what)
    device = ctx.device
    loader = load_checker if kind == "checker" else load_classifier
    return ctx.models.get(f"safety-{kind}:{folder}:{device}", lambda: loader(folder, device), size=module_bytes,
                          release=release_modules, kind="safety")


def _checker(stage: Any, images: list[Any], adjustment: float) -> list[dict[str, Any]]:
    from .models import checker_scores

    return checker_scores(stage.model, stage.processor, images, adjustment, stage.device)


def _classifier(stage: Any, images: list[Any], threshold: float) -> list[dict[str, Any]]:
    from .models import classifier_scores

    return classifier_scores(stage, images, threshold)


def _run_batches(ctx: RunContext, items: list[ImageItem], indices: list[int], batch_size: int, fn: Any,
                 done: int = 0, total: int | None = None) -> dict[int, dict[str, Any]]:
    total = total or len(indices)
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(indices), batch_size):
        ctx.check_cancelled()
        chunk = indices[start:start + batch_size]
        for i, r in zip(chunk, fn([items[i].image.convert("RGB") for i in chunk]), strict=True):
            out[i] = r
        done += len(chunk)
        ctx.progress(done, total, message=f"checked {done} of {total}")
    return out


def _blur(image: Any) -> Any:
    from PIL import ImageFilter

    w, h = image.size
    small = image.resize((max(1, w // 32), max(1, h // 32)))
    return small.resize((w, h)).filter(ImageFilter.GaussianBlur(radius=max(2, max(w, h) // 32)))


def _label(item: ImageItem, i: int) -> str:
    bits = [f"image {i}"] + ([f"'{item.name}'"] if item.name else []) + \
        ([f"seed {item.seed}"] if item.seed is not None else [])
    return " ".join(bits)


def _why(v: dict[str, Any]) -> str:
    parts = []
    if "checker" in v:
        c = v["checker"]
        parts.append(f"checker concept score {c['score']:+.3f} (concepts {c['concepts']})")
    if "classifier" in v:
        c = v["classifier"]
        parts.append(f"classifier NSFW probability {c['nsfw_probability']:.3f}")
    return " and ".join(parts)


def _apply(ctx: RunContext, items: list[ImageItem], verdicts: list[dict[str, Any]], unsafe: set[int],
           policy: str) -> Images:
    out = Images()
    for i, item in enumerate(items):
        v = verdicts[i]
        v["unsafe"] = i in unsafe
        v["action"] = ACTIONS[policy] if i in unsafe else "kept"
        if i in unsafe:
            ctx.log(f"{_label(item, i)} {v['action']} as unsafe: {_why(v)}", level="warning")
            if policy == "drop":
                continue
        image = _blur(item.image) if (i in unsafe and policy == "blur") else item.image
        flags = {**item.flags, "safety": dict(v)}
        if i in unsafe:
            flags["nsfw"] = dict(v)
        out.append(ImageItem(image=image, seed=item.seed, prompt=item.prompt, name=item.name,
                             meta=dict(item.meta), flags=flags))
    return out


def _report(ctx: RunContext, items: list[ImageItem], verdicts: list[dict[str, Any]], unsafe: set[int],
            policy: str, checker: str | None, classifier: str | None) -> None:
    rows = [{"index": i, "name": it.name, "seed": it.seed, **verdicts[i]} for i, it in enumerate(items)]
    path = ctx.node_dir() / "safety.json"
    path.write_text(json.dumps({"policy": policy, "checker": checker, "classifier": classifier,
                                "checked": len(items), "unsafe": sorted(unsafe), "images": rows}, indent=1))
    ctx.artifact(path)
    ctx.log(f"{len(unsafe)} of {len(items)} image(s) unsafe" + (f", {ACTIONS[policy]}" if unsafe else "")
            + f"; report: {path}")
