"""Branches and a join, then a foreach of sandboxed tasks (FOREACH_N wide, 16 by default)."""

import os

from metaflow import FlowSpec, sandbox, step


class FanoutFlow(FlowSpec):
    @step
    def start(self):
        self.base = 10
        self.next(self.left, self.right)

    @sandbox
    @step
    def left(self):
        self.side = self.base + 1
        self.next(self.meet)

    @step
    def right(self):
        self.side = self.base + 2
        self.next(self.meet)

    @step
    def meet(self, inputs):
        self.total = sum(i.side for i in inputs)
        self.next(self.spread)

    @step
    def spread(self):
        self.items = list(range(int(os.environ.get("FOREACH_N", "16"))))
        self.next(self.square, foreach="items")

    @sandbox(memory=512)
    @step
    def square(self):
        self.sq = self.input * self.input + self.total
        self.next(self.gather)

    @step
    def gather(self, inputs):
        self.squares = sorted(i.sq for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FanoutFlow()
