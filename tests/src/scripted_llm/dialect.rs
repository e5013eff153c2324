//! The wire formats the scripted LLM speaks. OpenAI Chat Completions is rendered in `reply.rs`;
//! every other provider's stream layout lives in its own file here, fed the same resolved
//! [`Completion`] so one script drives any provider client.

mod anthropic;
mod bedrock;
mod gemini;
mod openai_responses;

use super::reply::{Completion, RenderContext};

/// A provider wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dialect {
    /// `POST …/chat/completions`, SSE of `chat.completion.chunk`s (OpenAI, Azure, OpenRouter,
    /// Vercel AI Gateway and every compatible server).
    #[default]
    OpenAiChat,
    /// `POST …/responses`, SSE of typed `response.*` events (OpenAI and Azure).
    OpenAiResponses,
    /// `POST …/v1/messages`, SSE of Anthropic Messages events.
    Anthropic,
    /// `POST …/models/{model}:streamGenerateContent?alt=sse`, SSE of `GenerateContentResponse`s.
    Gemini,
    /// `POST …/model/{model}/converse-stream`, AWS event-stream frames.
    Bedrock,
}

impl Dialect {
    /// Whether a `POST` to `path` is a completion request in this dialect.
    pub(crate) fn serves(self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or(path);
        match self {
            Dialect::OpenAiChat => path.ends_with("/chat/completions"),
            Dialect::OpenAiResponses => path.ends_with("/responses"),
            Dialect::Anthropic => path.ends_with("/messages"),
            Dialect::Gemini => path.ends_with(":streamGenerateContent") || path.ends_with(":generateContent"),
            Dialect::Bedrock => path.ends_with("/converse-stream") || path.ends_with("/converse"),
        }
    }

    /// Whether a request to `path` whose body's `stream` is `stream` asks for a streamed answer.
    pub(crate) fn is_stream(self, path: &str, stream: Option<bool>) -> bool {
        let path = path.split('?').next().unwrap_or(path);
        match self {
            Dialect::OpenAiChat | Dialect::OpenAiResponses | Dialect::Anthropic => stream.unwrap_or(false),
            Dialect::Gemini => path.ends_with(":streamGenerateContent"),
            Dialect::Bedrock => path.ends_with("/converse-stream"),
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Dialect::Bedrock => "application/vnd.amazon.eventstream",
            _ => "text/event-stream",
        }
    }

    /// The stream messages for `completion`. Only called for dialects other than OpenAI Chat.
    pub(crate) fn render_stream(self, completion: &Completion<'_>, ctx: &RenderContext<'_>) -> Vec<Vec<u8>> {
        match self {
            Dialect::OpenAiChat => unreachable!("OpenAI Chat Completions is rendered by Reply itself"),
            Dialect::OpenAiResponses => openai_responses::render_stream(completion, ctx),
            Dialect::Anthropic => anthropic::render_stream(completion, ctx),
            Dialect::Gemini => gemini::render_stream(completion, ctx),
            Dialect::Bedrock => bedrock::render_stream(completion, ctx),
        }
    }
}
