"""The sample node's pieces, exactly: variant defaults and limits, prompt lists, jobs, LoRA scales."""

from __future__ import annotations

import pytest

from fluxkiln.engine import NodeError
from fluxkiln.plugins.flux.sample import (DEFAULT_GUIDANCE, MAX_PROMPTS, check_variant, make_jobs, prompt_list,
                                          scaled_adapters)


def test_variant_defaults_and_limits():
    assert check_variant("dev", None, None) == (28, DEFAULT_GUIDANCE)
    assert check_variant("dev", 50, 5.5) == (50, 5.5)
    assert check_variant("schnell", None, None) == (4, None)
    assert check_variant("schnell", 4, None) == (4, None)
    with pytest.raises(NodeError) as err:
        check_variant("dev", 51, None)
    assert err.value.key == "num_inference_steps" and "at most 50 steps, got num_inference_steps = 51" in str(err.value)
    assert "use 1 to 50 (default 28)" in (err.value.hint or "")
    with pytest.raises(NodeError) as err:
        check_variant("schnell", 5, None)
    assert "at most 4 steps" in str(err.value) and "use 1 to 4 (default 4)" in (err.value.hint or "")
    with pytest.raises(NodeError) as err:
        check_variant("schnell", 4, 3.0)
    assert err.value.key == "guidance"


def test_prompt_lists():
    assert prompt_list("a cat") == ["a cat"]
    assert prompt_list(["a", 2]) == ["a", "2"]
    assert len(prompt_list(["p"] * MAX_PROMPTS)) == MAX_PROMPTS
    for bad, words in (([], "empty list"), (["p"] * (MAX_PROMPTS + 1), f"{MAX_PROMPTS + 1} prompts, more than")):
        with pytest.raises(NodeError) as err:
            prompt_list(bad)
        assert err.value.key == "prompt" and words in str(err.value) and err.value.hint


def size_of(img):
    return (64, 32) if img is None else (img * 16, img * 16)


def test_text_to_image_makes_one_job_per_prompt():
    jobs = make_jobs(["a", "b"], None, size_of)
    assert [(j.prompt, j.prompt_index, j.size, j.init, j.init_label) for j in jobs] == [("a", 0, (64, 32), None, None),
                                                                             ("b", 1, (64, 32), None, None)]
    assert make_jobs(["a"], [], size_of)[0].size == (64, 32)


def test_image_to_image_jobs_pair_prompts_with_images():
    one = make_jobs(["a", "b"], [(2, "x.png", "own")], size_of)
    assert [(j.prompt, j.prompt_index, j.size, j.init, j.init_label) for j in one] == [("a", 0, (32, 32), 2, "x.png"),
                                                                            ("b", 1, (32, 32), 2, "x.png")]
    inputs = [(1, "p.png", "own p"), (3, "q.png", None)]
    paired = make_jobs(["a", "b"], inputs, size_of)
    assert [(j.prompt, j.prompt_index, j.size, j.init, j.init_label) for j in paired] == [("a", 0, (16, 16), 1, "p.png"),
                                                                               ("b", 1, (48, 48), 3, "q.png")]
    assert [j.prompt for j in make_jobs([""], inputs, size_of)] == ["own p", ""], "empty prompt: each keeps its own"
    assert [j.prompt for j in make_jobs(["one"], inputs, size_of)] == ["one", "one"]
    with pytest.raises(NodeError) as err:
        make_jobs(["a", "b", "c"], inputs, size_of)
    assert err.value.key == "prompt" and "2 input images and 3 prompts" in str(err.value)


def test_lora_scale_multiplies_every_adapter_scale():
    adapters = [{"name": "a", "scale": 0.5}, {"name": "b", "scale": 2}]
    assert scaled_adapters(adapters, None) == adapters and scaled_adapters(adapters, None) is not adapters
    assert scaled_adapters(adapters, 3.0) == [{"name": "a", "scale": 1.5}, {"name": "b", "scale": 6.0}]
    assert adapters[0]["scale"] == 0.5, "the model's own list is not changed"
