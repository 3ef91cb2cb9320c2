from metaflow import FlowSpec, daytona, step


class DaytonaFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.work)

    @daytona(cpu=1, memory=1024)
    @step
    def work(self):
        self.ok = True
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    DaytonaFlow()
