"""The TUI on the tiny built-in FLUX model: run until every node is done and see the images; the gallery
shows the current run's images, the previous run's one key away."""

from __future__ import annotations

import asyncio
import time

from fluxkiln.engine.registry import Registry
from fluxkiln.engine.runner import Engine
from fluxkiln.tui.app import FluxkilnApp
from fluxkiln.tui.images import ImagePreview, ImageView

RECIPE = '''[recipe]
name = "tiny"

[nodes.base]
type = "load_model"
model = "builtin:tiny-flux"

[nodes.images]
type = "sample"
model = "@base"
prompt = "a [red]lighthouse[/red]"
megapixels = "0.25"
num_inference_steps = 2
num_outputs = 2
seed = 1

[nodes.saved]
type = "save"
images = "@images"
output_format = "png"
'''


async def until(pilot, cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting for the UI"
        await pilot.pause(0.05)
    await pilot.pause()


def screen_text(app) -> str:
    return "\n".join("".join(seg.text for seg in strip) for strip in app.screen._compositor.render_strips())


def test_run_the_tiny_model_and_see_the_images(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.toml"
    path.write_text(RECIPE)
    app = FluxkilnApp(path, engine=Engine(Registry.load(), cache_dir=fresh_cache), validate_delay=0.02)

    async def run(pilot) -> None:
        before = app.main.runs_ended
        await pilot.press("ctrl+r")
        await until(pilot, lambda: app.main.runs_ended > before)

    async def script(pilot):
        await until(pilot, lambda: app.main.status.status.problems == 0)
        await run(pilot)
        assert {n: i.state for n, i in app.main.model.nodes.items()} == dict.fromkeys(
            ("base", "images", "saved"), "done")
        preview = app.main.query_one(ImagePreview)
        assert len(preview.thumbs) == 2 and "Images (2)" in screen_text(app)
        await pilot.press("f5")
        await pilot.pause()
        shown = screen_text(app)
        assert "1/2 saved · saved_0.png" in shown and "▀" in shown
        view = app.main.query_one(ImageView)
        region = view.content_region
        y = region.y + region.height // 2
        cells = [app.screen._compositor.get_style_at(x, y) for x in range(region.x, region.right)]
        painted = [c for c in cells if c.bgcolor is not None and c.color is not None and c.bgcolor.triplet]
        assert len(painted) >= region.width // 3  # the picture covers the middle row of the view
        preview.focus()
        await pilot.press("right")
        assert preview.index == 1 and "2/2 saved · saved_1.png" in screen_text(app)

        # without the save node the preview shows the sampled images, captioned with their prompt
        app.main.editor.load_text(RECIPE.split("[nodes.saved]")[0])
        await until(pilot, lambda: app.main.status.status.problems == 0 and len(app.main.model.nodes) == 2)
        await run(pilot)
        assert app.main.model.nodes["images"].state == "cached"
        await pilot.pause()
        assert "1/2 images · #1 · seed 1 · a [red]lighthouse[/red]" in screen_text(app)
        assert len(preview.thumbs) == 2 and "Images (2)" in screen_text(app)  # this run's, not 4
        assert "↑ 1 older run" in screen_text(app)
        await pilot.press("up")  # the previous run's images, one key away
        assert "1/2 saved · saved_0.png" in screen_text(app) and "run 1 of 2" in screen_text(app)
        await pilot.press("down")
        assert "1/2 images · #1 · seed 1" in screen_text(app)

    async def main():
        async with app.run_test(size=(140, 45)) as pilot:
            await script(pilot)

    asyncio.run(main())
