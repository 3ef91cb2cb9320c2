"""A sandboxed foreach that reads a Metaflow Config: the fast path must run it (not fall back)."""

from metaflow import Config, FlowSpec, sandbox, step


class ConfigFlow(FlowSpec):
    settings = Config("settings", default_value={"scale": 1, "label": "default"})

    @step
    def start(self):
        self.items = [1, 2]
        self.next(self.work, foreach="items")

    @sandbox
    @step
    def work(self):
        self.value = self.input * self.settings.scale
        self.label = self.settings.label
        self.next(self.join)

    @step
    def join(self, inputs):
        self.values = sorted(i.value for i in inputs)
        self.labels = sorted({i.label for i in inputs})
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ConfigFlow()
