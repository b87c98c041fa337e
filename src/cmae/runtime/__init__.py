"""What every command that trains or evaluates shares: device, seeds and allocator (device),
process groups (distributed), checkpoint files (checkpoint), optimizer groups and schedules
(optim)."""
