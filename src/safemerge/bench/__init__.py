"""The benchmark layer: tasks, attacks, the zoo, suites and reports. It produces model folders and reads
results like any user; nothing in the core imports it."""
