"""A Locust load shape that steps the number of users up and back down, for the autoscaling run
(`python -m load.autoscale`); given to Locust beside the user: `-f load/locustfile.py,load/step_shape.py`.

    --steps 60:2,180:8,300:2    2 users until second 60, then 8 until 180, then 2 until 300, then stop
"""

from __future__ import annotations

from locust import LoadTestShape, events

from load.autoscale import parse_steps


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--steps", default="60:2,180:8,300:2",
                        help="END_SECOND:USERS,... users per step; the test stops after the last step")


class StepLoad(LoadTestShape):
    def tick(self):
        if not hasattr(self, "steps"):
            self.steps = parse_steps(self.runner.environment.parsed_options.steps)
        now = self.get_run_time()
        for end, users in self.steps:
            if now < end:
                return users, users  # spawn the whole step at once
        return None
