"""One trial: the devices it gets, the memory planner's verdict, and the runner that launches, drives and
stops a server."""
