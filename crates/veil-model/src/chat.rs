//! Chat prompts rendered with the model's own template.
//!
//! The GGUF file carries the Jinja chat template the model was trained with
//! (`tokenizer.chat_template`); `minijinja` renders it, with Python-style string methods enabled
//! because Hugging Face templates call them.

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl ChatMessage {
    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// A message from the model.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: "assistant".into(),
            content: content.into(),
        }
    }

    /// A system prompt.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// A parsed chat template, ready to render conversations.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    /// Parses a template from its source; `bos` and `eos` are exposed to it as `bos_token` and
    /// `eos_token`, as Hugging Face does.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::ChatTemplate(format!("{e:#}")))?;
        Ok(Self {
            env,
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// Reads the template stored in a GGUF file.
    pub fn from_gguf(gguf: &GgufFile, bos: &str, eos: &str) -> Result<Self> {
        Self::new(gguf.string("tokenizer.chat_template")?, bos, eos)
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends where the assistant's
    /// answer should begin.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::ChatTemplate(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages
                    .iter()
                    .map(|m| minijinja::context! { role => &m.role, content => &m.content })
                    .collect::<Vec<_>>(),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| ModelError::ChatTemplate(format!("{e:#}")))
    }
}
