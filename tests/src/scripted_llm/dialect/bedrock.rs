//! PLACEHOLDER: the bedrock stream layout is being written.

use super::super::reply::{Completion, RenderContext};

pub(crate) fn render_stream(_completion: &Completion<'_>, _ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
    panic!("the scripted LLM does not speak bedrock yet")
}
