"""Write ``top_level.txt`` into the wheel's .dist-info: Metaflow lists extension distributions by it."""

from __future__ import annotations

from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class TopLevelHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        meta = self.build_config.builder.metadata
        name = meta.name.replace("-", "_")
        path = "%s-%s.dist-info/top_level.txt" % (name, meta.version)
        build_data["force_include"]["top_level.txt"] = path
        build_data.setdefault("force_include_editable", {})["top_level.txt"] = path
