"""A step that needs a pip package the launcher does not have."""

from metaflow import FlowSpec, sandbox, step


class PipFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.joke)

    @sandbox(packages=["pyjokes==0.8.3"])
    @step
    def joke(self):
        import pyjokes

        self.joke_text = pyjokes.get_joke()
        self.module_file = pyjokes.__file__
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    PipFlow()
