//! PEFT adapter files.
