//! Integration tests: a real orchestrator (in-process, on a free port) against the scripted LLM,
//! on SQLite files or a fresh PostgreSQL database. One module per surface.

mod agent_loop;
mod bad_input;
mod chat_lifecycle;
mod common;
mod compaction;
mod edit;
mod fork;
mod images;
mod interrupt;
mod provider_anthropic;
mod provider_bedrock;
mod provider_gemini;
mod provider_openai;
mod providers_admin;
mod queue;
mod resume;
mod retries;
mod subagents;
mod titles;
mod usage;
mod workspaces;
