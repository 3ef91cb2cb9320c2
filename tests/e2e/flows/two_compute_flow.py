from metaflow import FlowSpec, batch, sandbox, step


class TwoComputeFlow(FlowSpec):
    @batch
    @sandbox
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    TwoComputeFlow()
