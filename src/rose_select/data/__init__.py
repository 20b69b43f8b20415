"""The data wing: every pool and preference format read into ``records`` types.

| module | what |
|---|---|
| ``reading``     | raw JSON/JSONL/HF reading, problem reporting (file, line, record, field), field helpers |
| ``pools``       | instruction pools in every format -> ``InstructionRecord`` |
| ``preferences`` | preference sets, subtask layouts, SFT targets, test prompts -> ``PreferenceTriple`` |
| ``heldout``     | held-out evaluation pairs (larger-shot file minus the selection prompts) |
| ``validate``    | ``rose data validate``: every problem of a file in one report |
| ``builtin``     | files shipped in the package and the demo pool |
"""

from rose_select.data.builtin import (
    BUILTIN,
    DEMO_MAX_CHARS,
    DEMO_PREFERENCES,
    DEMO_SNAPSHOT,
    DEMO_WINDOW,
    asset_path,
    demo_pool,
    resolve_input,
    sharegpt_package_file,
)
from rose_select.data.heldout import (
    find_heldout_file,
    first_per_subtask,
    heldout_pairs,
    with_preference,
)
from rose_select.data.pools import POOL_FORMATS, load_pool, pool_row, write_pool_jsonl
from rose_select.data.preferences import (
    KNOWN_SUBTASKS,
    PREFERENCE_FORMATS,
    SUBTASK_CAPS,
    SubtaskSettings,
    load_preferences,
    load_sft_targets,
    load_test_prompts,
    shot_file_info,
    subtask_counts,
    subtask_layout,
    subtask_sizes,
)
from rose_select.data.reading import iter_json_array, parse_transcript
from rose_select.data.validate import ValidationReport, validate_file

__all__ = [
    "BUILTIN", "resolve_input",
    "DEMO_MAX_CHARS", "DEMO_PREFERENCES", "DEMO_SNAPSHOT", "DEMO_WINDOW", "KNOWN_SUBTASKS", "POOL_FORMATS", "PREFERENCE_FORMATS",
    "SUBTASK_CAPS", "SubtaskSettings", "ValidationReport", "asset_path", "demo_pool", "find_heldout_file", "first_per_subtask",
    "heldout_pairs", "with_preference", "iter_json_array", "load_pool", "load_preferences", "load_sft_targets",
    "load_test_prompts", "parse_transcript", "pool_row", "sharegpt_package_file", "shot_file_info",
    "subtask_counts", "subtask_layout", "subtask_sizes", "validate_file", "write_pool_jsonl",
]
