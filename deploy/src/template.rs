//! A Go `text/template` interpreter with the Helm/Sprig functions the chart uses.
//!
//! What is implemented is what Go does: `{{- ` and ` -}}` trim the whitespace beside an
//! action, `{{/* */}}` comments, pipelines with `|` passing the value as the last argument,
//! `if`/`else if`/`else`, `range` (lists by index, maps by sorted key, optional `$i, $v :=`),
//! `with`, `define` and Helm's `include`, variables (`$x := …`, `$x = …`, `$` the root),
//! fields of maps (`.Values.a.b`; a missing key is nil, a field of nil is an error, as in
//! Go), `and`/`or` short-circuiting, and Go's comparison rules (an int literal never equals a
//! float64 from a values file: "incompatible types for comparison", as Helm reports).
//! Anything else — an unknown function, keyword or syntax — is an error at parse time naming
//! the file, line and column, never a silent difference from Helm.

use std::collections::BTreeMap;

use crate::value::{Value, go_float_v};

/// Where a template error happened and what it was.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct TemplateError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// True for `fail` and `required`: the chart refused the values (Helm's "execution
    /// error"), not a bug in a template.
    pub refused: bool,
}

#[derive(Clone, Copy, Debug)]
struct Pos {
    line: usize,
    col: usize,
}

/// A parsed set of template files sharing one namespace of `define`d templates (as all
/// files of a Helm chart do).
#[derive(Debug, Default)]
pub struct TemplateSet {
    files: BTreeMap<String, Vec<Node>>,
    defines: BTreeMap<String, (String, Vec<Node>)>,
}

#[derive(Debug, Clone)]
enum Node {
    Text(String),
    Action(Pipeline),
    If {
        branches: Vec<(Pipeline, Vec<Node>)>,
        otherwise: Vec<Node>,
    },
    Range {
        vars: Vec<String>,
        pipe: Pipeline,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
    With {
        pipe: Pipeline,
        body: Vec<Node>,
        otherwise: Vec<Node>,
    },
}

#[derive(Debug, Clone)]
struct Pipeline {
    pos: Pos,
    /// `$a := …` (declare) or `$a = …` (assign).
    decl: Option<(Vec<String>, bool)>,
    cmds: Vec<Vec<Operand>>,
}

#[derive(Debug, Clone)]
enum Operand {
    /// `.a.b` (empty: `.`).
    Field(Vec<String>),
    /// `$x.a.b` (`$` alone is the root).
    Var(String, Vec<String>),
    Lit(Value),
    Func(String),
    /// `( pipeline ).a.b`
    Sub(Box<Pipeline>, Vec<String>),
}

const FUNCTIONS: &[&str] = &[
    "include",
    "toYaml",
    "toJson",
    "nindent",
    "indent",
    "quote",
    "squote",
    "default",
    "required",
    "fail",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "and",
    "or",
    "not",
    "len",
    "join",
    "printf",
    "print",
    "list",
    "hasKey",
    "empty",
    "toString",
    "int",
    "kindIs",
    "contains",
    "hasPrefix",
    "hasSuffix",
    "trimSuffix",
    "trimPrefix",
    "trunc",
    "lower",
    "upper",
    "replace",
    "has",
    "dict",
    "ternary",
    "first",
    "b64enc",
    "index",
];

// ---------------------------------------------------------------------------------------
// Lexing: text and actions.

enum Piece {
    Text(String),
    Action { body: String, pos: Pos },
}

fn position(src: &str, offset: usize) -> Pos {
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
    Pos { line, col }
}

fn split_pieces(file: &str, src: &str) -> Result<Vec<Piece>, TemplateError> {
    let mut pieces = Vec::new();
    let mut rest = 0;
    let mut trim_next = false;
    while let Some(found) = src[rest..].find("{{") {
        let start = rest + found;
        let mut text = &src[rest..start];
        if trim_next {
            text = text.trim_start();
        }
        let mut inner_start = start + 2;
        let trim_before = src[inner_start..].starts_with("- ")
            || src[inner_start..].starts_with("-\n")
            || src[inner_start..].starts_with("-\t");
        if trim_before {
            text = text.trim_end();
            inner_start += 1;
        }
        pieces.push(Piece::Text(text.to_owned()));
        let pos = position(src, start);
        // Find the closing braces outside string literals.
        let bytes = src.as_bytes();
        let mut i = inner_start;
        let mut end = None;
        while i < bytes.len() {
            match bytes[i] {
                b'"' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'"' {
                        if bytes[i] == b'\\' {
                            i += 1;
                        }
                        i += 1;
                    }
                }
                b'`' => {
                    i += 1;
                    while i < bytes.len() && bytes[i] != b'`' {
                        i += 1;
                    }
                }
                b'}' if bytes.get(i + 1) == Some(&b'}') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
            i += 1;
        }
        let Some(end) = end else {
            return Err(err(file, pos, "unclosed action (no `}}`)"));
        };
        let mut body = &src[inner_start..end];
        trim_next = body.ends_with(" -") || body.ends_with("\n-") || body.ends_with("\t-");
        if trim_next {
            body = &body[..body.len() - 1];
        }
        let trimmed = body.trim();
        if !(trimmed.starts_with("/*") && trimmed.ends_with("*/")) {
            pieces.push(Piece::Action {
                body: body.to_owned(),
                pos,
            });
        }
        rest = end + 2;
    }
    let mut text = &src[rest..];
    if trim_next {
        text = text.trim_start();
    }
    pieces.push(Piece::Text(text.to_owned()));
    Ok(pieces)
}

fn err(file: &str, pos: Pos, message: impl Into<String>) -> TemplateError {
    TemplateError {
        file: file.to_owned(),
        line: pos.line,
        col: pos.col,
        message: message.into(),
        refused: false,
    }
}

// ---------------------------------------------------------------------------------------
// Tokens of one action.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Field(Vec<String>),
    Var(String, Vec<String>),
    Str(String),
    Num(Value),
    Pipe,
    Open,
    Close(Vec<String>),
    Declare,
    Assign,
    Comma,
}

fn field_chain(chars: &[char], i: &mut usize) -> Vec<String> {
    let mut fields = Vec::new();
    while *i < chars.len() && chars[*i] == '.' {
        *i += 1;
        let start = *i;
        while *i < chars.len() && (chars[*i].is_alphanumeric() || chars[*i] == '_') {
            *i += 1;
        }
        if start == *i {
            break;
        }
        fields.push(chars[start..*i].iter().collect());
    }
    fields
}

fn tokenize(file: &str, pos: Pos, body: &str) -> Result<Vec<Tok>, TemplateError> {
    let chars: Vec<char> = body.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '|' => {
                toks.push(Tok::Pipe);
                i += 1;
            }
            '(' => {
                toks.push(Tok::Open);
                i += 1;
            }
            ')' => {
                i += 1;
                toks.push(Tok::Close(field_chain(&chars, &mut i)));
            }
            ',' => {
                toks.push(Tok::Comma);
                i += 1;
            }
            ':' if chars.get(i + 1) == Some(&'=') => {
                toks.push(Tok::Declare);
                i += 2;
            }
            '=' => {
                toks.push(Tok::Assign);
                i += 1;
            }
            '.' => {
                if chars
                    .get(i + 1)
                    .is_none_or(|c| !(c.is_alphanumeric() || *c == '_'))
                {
                    toks.push(Tok::Field(Vec::new()));
                    i += 1;
                } else {
                    toks.push(Tok::Field(field_chain(&chars, &mut i)));
                }
            }
            '$' => {
                i += 1;
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let name: String = chars[start..i].iter().collect();
                let fields = field_chain(&chars, &mut i);
                toks.push(Tok::Var(name, fields));
            }
            '"' => {
                let mut s = String::new();
                i += 1;
                loop {
                    let Some(&c) = chars.get(i) else {
                        return Err(err(file, pos, "unterminated string"));
                    };
                    i += 1;
                    match c {
                        '"' => break,
                        '\\' => {
                            let e = chars.get(i).copied().unwrap_or('\\');
                            i += 1;
                            s.push(match e {
                                'n' => '\n',
                                't' => '\t',
                                '"' => '"',
                                '\\' => '\\',
                                other => {
                                    return Err(err(
                                        file,
                                        pos,
                                        format!("unsupported escape \\{other} in a string"),
                                    ));
                                }
                            });
                        }
                        c => s.push(c),
                    }
                }
                toks.push(Tok::Str(s));
            }
            '`' => {
                i += 1;
                let start = i;
                while i < chars.len() && chars[i] != '`' {
                    i += 1;
                }
                toks.push(Tok::Str(chars[start..i].iter().collect()));
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '-' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) =>
            {
                let start = i;
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                    i += 1;
                }
                let text: String = chars[start..i].iter().collect();
                let num = if text.contains('.') {
                    text.parse().map(Value::Float).ok()
                } else {
                    text.parse().map(Value::Int).ok()
                };
                toks.push(Tok::Num(
                    num.ok_or_else(|| err(file, pos, format!("bad number {text}")))?,
                ));
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                toks.push(Tok::Ident(chars[start..i].iter().collect()));
            }
            other => return Err(err(file, pos, format!("unexpected {other:?} in action"))),
        }
    }
    Ok(toks)
}

// ---------------------------------------------------------------------------------------
// Parsing.

struct Parser<'a> {
    file: &'a str,
    pieces: Vec<Piece>,
    at: usize,
}

enum Stop {
    End,
    Else(Option<(Pipeline, Pos)>),
    Eof,
}

impl TemplateSet {
    /// Parses `src` as the file `name` (its `define`s join the set's).
    pub fn add_file(&mut self, name: &str, src: &str) -> Result<(), TemplateError> {
        let pieces = split_pieces(name, src)?;
        let mut parser = Parser {
            file: name,
            pieces,
            at: 0,
        };
        let (nodes, stop) = parser.list(self, true)?;
        if !matches!(stop, Stop::Eof) {
            return Err(err(
                name,
                Pos { line: 0, col: 0 },
                "unexpected {{end}} or {{else}}",
            ));
        }
        self.files.insert(name.to_owned(), nodes);
        Ok(())
    }

    /// Renders file `name` with `data` as `.` and `$`.
    pub fn render(&self, name: &str, data: &Value) -> Result<String, TemplateError> {
        let nodes = self.files.get(name).ok_or_else(|| TemplateError {
            file: name.to_owned(),
            line: 0,
            col: 0,
            message: "no such template file".into(),
            refused: false,
        })?;
        let mut exec = Exec {
            set: self,
            file: name.to_owned(),
            vars: vec![("$".to_owned(), data.clone())],
            depth: 0,
        };
        let mut out = String::new();
        exec.walk(nodes, data, &mut out)?;
        Ok(out)
    }
}

impl Parser<'_> {
    fn list(
        &mut self,
        set: &mut TemplateSet,
        top: bool,
    ) -> Result<(Vec<Node>, Stop), TemplateError> {
        let mut nodes = Vec::new();
        while self.at < self.pieces.len() {
            let piece = std::mem::replace(&mut self.pieces[self.at], Piece::Text(String::new()));
            self.at += 1;
            let (body, pos) = match piece {
                Piece::Text(t) => {
                    if !t.is_empty() {
                        nodes.push(Node::Text(t));
                    }
                    continue;
                }
                Piece::Action { body, pos } => (body, pos),
            };
            let toks = tokenize(self.file, pos, &body)?;
            match toks.first() {
                Some(Tok::Ident(k)) if k == "end" && toks.len() == 1 => {
                    return Ok((nodes, Stop::End));
                }
                Some(Tok::Ident(k)) if k == "else" => {
                    if toks.len() == 1 {
                        return Ok((nodes, Stop::Else(None)));
                    }
                    if toks.get(1) == Some(&Tok::Ident("if".into())) {
                        let pipe = self.pipeline(pos, &toks[2..])?;
                        return Ok((nodes, Stop::Else(Some((pipe, pos)))));
                    }
                    return Err(err(
                        self.file,
                        pos,
                        "only `else` and `else if` are supported",
                    ));
                }
                Some(Tok::Ident(k)) if k == "if" => {
                    let mut branches = vec![(self.pipeline(pos, &toks[1..])?, Vec::new())];
                    let mut otherwise = Vec::new();
                    loop {
                        let (body, stop) = self.list(set, false)?;
                        if let Some(last) = branches.last_mut() {
                            last.1 = body;
                        }
                        match stop {
                            Stop::End => break,
                            Stop::Else(Some((pipe, _))) => branches.push((pipe, Vec::new())),
                            Stop::Else(None) => {
                                let (body, stop) = self.list(set, false)?;
                                self.expect_end(pos, stop)?;
                                otherwise = body;
                                break;
                            }
                            Stop::Eof => return Err(err(self.file, pos, "`if` without `end`")),
                        }
                    }
                    nodes.push(Node::If {
                        branches,
                        otherwise,
                    });
                }
                Some(Tok::Ident(k)) if k == "range" || k == "with" => {
                    let keyword = k.clone();
                    let mut rest = &toks[1..];
                    let mut vars = Vec::new();
                    if keyword == "range" {
                        // `$v :=` or `$i, $v :=`
                        let decl_at = rest.iter().position(|t| *t == Tok::Declare);
                        if let Some(d) = decl_at {
                            for t in &rest[..d] {
                                match t {
                                    Tok::Var(name, f) if f.is_empty() => vars.push(name.clone()),
                                    Tok::Comma => {}
                                    _ => return Err(err(self.file, pos, "bad range variables")),
                                }
                            }
                            rest = &rest[d + 1..];
                        }
                    }
                    let pipe = self.pipeline(pos, rest)?;
                    let (body, stop) = self.list(set, false)?;
                    let otherwise = match stop {
                        Stop::End => Vec::new(),
                        Stop::Else(None) => {
                            let (body, stop) = self.list(set, false)?;
                            self.expect_end(pos, stop)?;
                            body
                        }
                        _ => return Err(err(self.file, pos, format!("`{keyword}` without `end`"))),
                    };
                    nodes.push(if keyword == "range" {
                        Node::Range {
                            vars,
                            pipe,
                            body,
                            otherwise,
                        }
                    } else {
                        Node::With {
                            pipe,
                            body,
                            otherwise,
                        }
                    });
                }
                Some(Tok::Ident(k)) if k == "define" => {
                    if !top {
                        return Err(err(self.file, pos, "`define` only at the top level"));
                    }
                    let Some(Tok::Str(name)) = toks.get(1) else {
                        return Err(err(self.file, pos, "`define` needs a quoted name"));
                    };
                    let name = name.clone();
                    let (body, stop) = self.list(set, false)?;
                    self.expect_end(pos, stop)?;
                    set.defines.insert(name, (self.file.to_owned(), body));
                }
                Some(Tok::Ident(k))
                    if matches!(k.as_str(), "template" | "block" | "break" | "continue") =>
                {
                    return Err(err(
                        self.file,
                        pos,
                        format!("`{k}` is not supported here (use include)"),
                    ));
                }
                _ => nodes.push(Node::Action(self.pipeline(pos, &toks)?)),
            }
        }
        Ok((nodes, Stop::Eof))
    }

    fn expect_end(&self, pos: Pos, stop: Stop) -> Result<(), TemplateError> {
        match stop {
            Stop::End => Ok(()),
            _ => Err(err(self.file, pos, "block without its `end`")),
        }
    }

    fn pipeline(&self, pos: Pos, toks: &[Tok]) -> Result<Pipeline, TemplateError> {
        let mut toks = toks;
        let mut decl = None;
        if let Some(d) = toks
            .iter()
            .position(|t| *t == Tok::Declare || *t == Tok::Assign)
        {
            let mut names = Vec::new();
            for t in &toks[..d] {
                match t {
                    Tok::Var(name, f) if f.is_empty() => names.push(name.clone()),
                    Tok::Comma => {}
                    _ => return Err(err(self.file, pos, "bad variable declaration")),
                }
            }
            decl = Some((names, toks[d] == Tok::Declare));
            toks = &toks[d + 1..];
        }
        let mut cmds = Vec::new();
        let mut cur = Vec::new();
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                Tok::Pipe => {
                    if cur.is_empty() {
                        return Err(err(self.file, pos, "empty command in pipeline"));
                    }
                    cmds.push(std::mem::take(&mut cur));
                }
                Tok::Open => {
                    // Find the matching close.
                    let mut depth = 0;
                    let mut j = i;
                    let close = loop {
                        match toks.get(j) {
                            Some(Tok::Open) => depth += 1,
                            Some(Tok::Close(_)) => {
                                depth -= 1;
                                if depth == 0 {
                                    break j;
                                }
                            }
                            Some(_) => {}
                            None => return Err(err(self.file, pos, "unclosed `(`")),
                        }
                        j += 1;
                    };
                    let inner = self.pipeline(pos, &toks[i + 1..close])?;
                    let Tok::Close(fields) = &toks[close] else {
                        return Err(err(self.file, pos, "unclosed `(`"));
                    };
                    cur.push(Operand::Sub(Box::new(inner), fields.clone()));
                    i = close;
                }
                Tok::Close(_) => return Err(err(self.file, pos, "unexpected `)`")),
                Tok::Field(f) => cur.push(Operand::Field(f.clone())),
                Tok::Var(n, f) => cur.push(Operand::Var(n.clone(), f.clone())),
                Tok::Str(s) => cur.push(Operand::Lit(Value::Str(s.clone()))),
                Tok::Num(n) => cur.push(Operand::Lit(n.clone())),
                Tok::Ident(name) => match name.as_str() {
                    "true" => cur.push(Operand::Lit(Value::Bool(true))),
                    "false" => cur.push(Operand::Lit(Value::Bool(false))),
                    "nil" => cur.push(Operand::Lit(Value::Null)),
                    f if FUNCTIONS.contains(&f) => cur.push(Operand::Func(f.to_owned())),
                    other => {
                        return Err(err(
                            self.file,
                            pos,
                            format!("function {other:?} not defined"),
                        ));
                    }
                },
                Tok::Declare | Tok::Assign | Tok::Comma => {
                    return Err(err(self.file, pos, "unexpected `:=`, `=` or `,`"));
                }
            }
            i += 1;
        }
        if cur.is_empty() {
            return Err(err(self.file, pos, "missing value for command"));
        }
        cmds.push(cur);
        Ok(Pipeline { pos, decl, cmds })
    }
}

// ---------------------------------------------------------------------------------------
// Execution.

struct Exec<'a> {
    set: &'a TemplateSet,
    file: String,
    vars: Vec<(String, Value)>,
    depth: usize,
}

/// Deepest `include` nesting (a template including itself ends here, not in a stack overflow).
const MAX_INCLUDE_DEPTH: usize = 64;

impl Exec<'_> {
    fn walk(&mut self, nodes: &[Node], dot: &Value, out: &mut String) -> Result<(), TemplateError> {
        for node in nodes {
            match node {
                Node::Text(t) => out.push_str(t),
                Node::Action(pipe) => {
                    let v = self.pipeline(pipe, dot)?;
                    if pipe.decl.is_none() {
                        out.push_str(&v.to_go_string());
                    }
                }
                Node::If {
                    branches,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let mut taken = false;
                    for (cond, body) in branches {
                        if self.pipeline(cond, dot)?.truthy() {
                            self.walk(body, dot, out)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken {
                        self.walk(otherwise, dot, out)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::With {
                    pipe,
                    body,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let v = self.pipeline(pipe, dot)?;
                    if v.truthy() {
                        self.walk(body, &v, out)?;
                    } else {
                        self.walk(otherwise, dot, out)?;
                    }
                    self.vars.truncate(mark);
                }
                Node::Range {
                    vars,
                    pipe,
                    body,
                    otherwise,
                } => {
                    let mark = self.vars.len();
                    let v = self.pipeline(pipe, dot)?;
                    let items: Vec<(Value, Value)> = match v {
                        Value::List(l) => l
                            .into_iter()
                            .enumerate()
                            .map(|(i, v)| (Value::Int(i as i64), v))
                            .collect(),
                        Value::Map(m) => m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect(),
                        Value::Null => Vec::new(),
                        other => {
                            return Err(self.error(
                                pipe.pos,
                                format!("range can't iterate over {}", other.to_go_string()),
                            ));
                        }
                    };
                    if items.is_empty() {
                        self.walk(otherwise, dot, out)?;
                    }
                    for (key, item) in items {
                        let inner = self.vars.len();
                        match vars.as_slice() {
                            [] => {}
                            [v] => self.vars.push((v.clone(), item.clone())),
                            [k, v] => {
                                self.vars.push((k.clone(), key));
                                self.vars.push((v.clone(), item.clone()));
                            }
                            _ => return Err(self.error(pipe.pos, "too many range variables")),
                        }
                        self.walk(body, &item, out)?;
                        self.vars.truncate(inner);
                    }
                    self.vars.truncate(mark);
                }
            }
        }
        Ok(())
    }

    fn error(&self, pos: Pos, message: impl Into<String>) -> TemplateError {
        err(&self.file, pos, message)
    }

    fn pipeline(&mut self, pipe: &Pipeline, dot: &Value) -> Result<Value, TemplateError> {
        let mut value: Option<Value> = None;
        for cmd in &pipe.cmds {
            value = Some(self.command(pipe.pos, cmd, dot, value)?);
        }
        let value = value.unwrap_or(Value::Null);
        if let Some((names, declare)) = &pipe.decl {
            for name in names {
                if *declare {
                    self.vars.push((name.clone(), value.clone()));
                } else {
                    let slot = self.vars.iter_mut().rev().find(|(n, _)| n == name);
                    match slot {
                        Some(slot) => slot.1 = value.clone(),
                        None => {
                            return Err(self.error(pipe.pos, format!("undefined variable ${name}")));
                        }
                    }
                }
            }
        }
        Ok(value)
    }

    fn operand(&mut self, pos: Pos, op: &Operand, dot: &Value) -> Result<Value, TemplateError> {
        match op {
            Operand::Field(fields) => self.fields(pos, dot.clone(), fields, "."),
            Operand::Var(name, fields) => {
                let base = self
                    .vars
                    .iter()
                    .rev()
                    .find(|(n, _)| n == name || (name.is_empty() && n == "$"))
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| self.error(pos, format!("undefined variable ${name}")))?;
                self.fields(pos, base, fields, &format!("${name}"))
            }
            Operand::Lit(v) => Ok(v.clone()),
            Operand::Sub(inner, fields) => {
                let v = self.pipeline(inner, dot)?;
                self.fields(pos, v, fields, "(…)")
            }
            Operand::Func(name) => self.call(pos, name, &[], dot, None),
        }
    }

    fn fields(
        &self,
        pos: Pos,
        mut v: Value,
        fields: &[String],
        base: &str,
    ) -> Result<Value, TemplateError> {
        let mut path = base.trim_end_matches('.').to_owned();
        for f in fields {
            v = match v {
                Value::Map(mut m) => m.remove(f).unwrap_or(Value::Null),
                Value::Null => {
                    return Err(self.error(pos, format!("nil pointer evaluating {path}.{f}")));
                }
                other => {
                    return Err(self.error(
                        pos,
                        format!("can't evaluate field {f} in type {} ({path})", other.kind()),
                    ));
                }
            };
            path.push('.');
            path.push_str(f);
        }
        Ok(v)
    }

    fn command(
        &mut self,
        pos: Pos,
        cmd: &[Operand],
        dot: &Value,
        piped: Option<Value>,
    ) -> Result<Value, TemplateError> {
        match &cmd[0] {
            Operand::Func(name) => self.call(pos, name, &cmd[1..], dot, piped),
            op => {
                if cmd.len() > 1 || piped.is_some() {
                    return Err(self.error(pos, "can't give an argument to a non-function"));
                }
                self.operand(pos, op, dot)
            }
        }
    }

    fn call(
        &mut self,
        pos: Pos,
        name: &str,
        arg_ops: &[Operand],
        dot: &Value,
        piped: Option<Value>,
    ) -> Result<Value, TemplateError> {
        // `and`/`or` evaluate their arguments lazily (Go ≥ 1.18).
        if name == "and" || name == "or" {
            let mut last = Value::Null;
            let total = arg_ops.len() + usize::from(piped.is_some());
            if total == 0 {
                return Err(self.error(pos, format!("{name}: wrong number of args")));
            }
            for op in arg_ops {
                last = self.operand(pos, op, dot)?;
                if last.truthy() == (name == "or") {
                    return Ok(last);
                }
            }
            if let Some(p) = piped {
                last = p;
            }
            return Ok(last);
        }
        let mut args = Vec::with_capacity(arg_ops.len() + 1);
        for op in arg_ops {
            args.push(self.operand(pos, op, dot)?);
        }
        if let Some(p) = piped {
            args.push(p);
        }
        self.function(pos, name, args)
    }

    fn function(&mut self, pos: Pos, name: &str, args: Vec<Value>) -> Result<Value, TemplateError> {
        let want = |n: usize| -> Result<(), TemplateError> {
            if args.len() == n {
                Ok(())
            } else {
                Err(err(
                    &self.file,
                    pos,
                    format!(
                        "wrong number of args for {name}: want {n} got {}",
                        args.len()
                    ),
                ))
            }
        };
        let s = |v: &Value| v.to_go_string();
        Ok(match name {
            "include" => {
                want(2)?;
                let tname = s(&args[0]);
                let (file, body) =
                    self.set.defines.get(&tname).ok_or_else(|| {
                        self.error(pos, format!("no template {tname:?} associated"))
                    })?;
                if self.depth >= MAX_INCLUDE_DEPTH {
                    return Err(self.error(pos, format!("include {tname:?}: nested too deep")));
                }
                let mut inner = Exec {
                    set: self.set,
                    file: file.clone(),
                    vars: vec![("$".to_owned(), args[1].clone())],
                    depth: self.depth + 1,
                };
                let mut out = String::new();
                inner.walk(body, &args[1], &mut out)?;
                Value::Str(out)
            }
            "toYaml" => {
                want(1)?;
                Value::Str(args[0].to_yaml())
            }
            "toJson" => {
                want(1)?;
                Value::Str(args[0].to_json().to_string())
            }
            "nindent" | "indent" => {
                want(2)?;
                let n = to_int(&args[0])
                    .ok_or_else(|| self.error(pos, format!("{name}: bad width")))?;
                let pad = " ".repeat(n.max(0) as usize);
                let text = s(&args[1]);
                let body = format!("{pad}{}", text.replace('\n', &format!("\n{pad}")));
                Value::Str(if name == "nindent" {
                    format!("\n{body}")
                } else {
                    body
                })
            }
            "quote" | "squote" => {
                let parts: Vec<String> = args
                    .iter()
                    .filter(|v| **v != Value::Null)
                    .map(|v| {
                        if name == "quote" {
                            go_quote(&s(v))
                        } else {
                            format!("'{}'", s(v))
                        }
                    })
                    .collect();
                Value::Str(parts.join(" "))
            }
            "default" => {
                if args.len() == 1 {
                    args[0].clone()
                } else {
                    want(2)?;
                    if args[1].truthy() {
                        args[1].clone()
                    } else {
                        args[0].clone()
                    }
                }
            }
            "required" => {
                want(2)?;
                if args[1] == Value::Null || args[1] == Value::Str(String::new()) {
                    let mut e = self.error(pos, s(&args[0]));
                    e.refused = true;
                    return Err(e);
                }
                args[1].clone()
            }
            "fail" => {
                want(1)?;
                let mut e = self.error(pos, s(&args[0]));
                e.refused = true;
                return Err(e);
            }
            "eq" | "ne" => {
                if args.len() < 2 {
                    return Err(self.error(pos, format!("{name}: missing argument for comparison")));
                }
                let mut any = false;
                for other in &args[1..] {
                    if go_compare(&args[0], other)
                        .map_err(|m| self.error(pos, format!("error calling {name}: {m}")))?
                        == std::cmp::Ordering::Equal
                    {
                        any = true;
                    }
                }
                Value::Bool(if name == "eq" { any } else { !any })
            }
            "lt" | "le" | "gt" | "ge" => {
                want(2)?;
                let ord = go_compare(&args[0], &args[1])
                    .map_err(|m| self.error(pos, format!("error calling {name}: {m}")))?;
                use std::cmp::Ordering::*;
                Value::Bool(match name {
                    "lt" => ord == Less,
                    "le" => ord != Greater,
                    "gt" => ord == Greater,
                    _ => ord != Less,
                })
            }
            "not" => {
                want(1)?;
                Value::Bool(!args[0].truthy())
            }
            "len" => {
                want(1)?;
                Value::Int(match &args[0] {
                    Value::Str(x) => x.len() as i64,
                    Value::List(l) => l.len() as i64,
                    Value::Map(m) => m.len() as i64,
                    other => return Err(self.error(pos, format!("len of type {}", other.kind()))),
                })
            }
            "join" => {
                want(2)?;
                let items: Vec<String> = match &args[1] {
                    Value::List(l) => l.iter().map(s).collect(),
                    Value::Null => Vec::new(),
                    other => vec![s(other)],
                };
                Value::Str(items.join(&s(&args[0])))
            }
            "printf" => {
                if args.is_empty() {
                    return Err(self.error(pos, "printf: missing format"));
                }
                Value::Str(go_printf(&s(&args[0]), &args[1..]).map_err(|m| self.error(pos, m))?)
            }
            "print" => Value::Str(args.iter().map(s).collect::<Vec<_>>().join("")),
            "list" => Value::List(args),
            "dict" => {
                if !args.len().is_multiple_of(2) {
                    return Err(self.error(pos, "dict: odd number of arguments"));
                }
                let mut m = BTreeMap::new();
                for pair in args.chunks(2) {
                    m.insert(s(&pair[0]), pair[1].clone());
                }
                Value::Map(m)
            }
            "hasKey" => {
                want(2)?;
                match &args[0] {
                    Value::Map(m) => Value::Bool(m.contains_key(&s(&args[1]))),
                    other => return Err(self.error(pos, format!("hasKey on {}", other.kind()))),
                }
            }
            "has" => {
                want(2)?;
                match &args[1] {
                    Value::List(l) => Value::Bool(l.contains(&args[0])),
                    Value::Null => Value::Bool(false),
                    other => return Err(self.error(pos, format!("has on {}", other.kind()))),
                }
            }
            "empty" => {
                want(1)?;
                Value::Bool(!args[0].truthy())
            }
            "toString" => {
                want(1)?;
                Value::Str(s(&args[0]))
            }
            "int" => {
                want(1)?;
                Value::Int(match &args[0] {
                    Value::Str(x) => x.trim().parse().unwrap_or(0),
                    other => to_int(other).unwrap_or(0),
                })
            }
            "kindIs" => {
                want(2)?;
                Value::Bool(s(&args[0]) == args[1].kind())
            }
            "contains" | "hasPrefix" | "hasSuffix" => {
                want(2)?;
                let (needle, hay) = (s(&args[0]), s(&args[1]));
                Value::Bool(match name {
                    "contains" => hay.contains(&needle),
                    "hasPrefix" => hay.starts_with(&needle),
                    _ => hay.ends_with(&needle),
                })
            }
            "trimSuffix" | "trimPrefix" => {
                want(2)?;
                let (affix, text) = (s(&args[0]), s(&args[1]));
                let out = if name == "trimSuffix" {
                    text.strip_suffix(affix.as_str()).unwrap_or(&text)
                } else {
                    text.strip_prefix(affix.as_str()).unwrap_or(&text)
                };
                Value::Str(out.to_owned())
            }
            "trunc" => {
                want(2)?;
                let n = to_int(&args[0]).unwrap_or(0).max(0) as usize;
                Value::Str(s(&args[1]).chars().take(n).collect())
            }
            "lower" => {
                want(1)?;
                Value::Str(s(&args[0]).to_lowercase())
            }
            "upper" => {
                want(1)?;
                Value::Str(s(&args[0]).to_uppercase())
            }
            "replace" => {
                want(3)?;
                Value::Str(s(&args[2]).replace(&s(&args[0]), &s(&args[1])))
            }
            "ternary" => {
                want(3)?;
                if args[2].truthy() {
                    args[0].clone()
                } else {
                    args[1].clone()
                }
            }
            "first" => {
                want(1)?;
                match &args[0] {
                    Value::List(l) => l.first().cloned().unwrap_or(Value::Null),
                    _ => Value::Null,
                }
            }
            "index" => {
                if args.is_empty() {
                    return Err(self.error(pos, "index: missing argument"));
                }
                let mut v = args[0].clone();
                for key in &args[1..] {
                    v = match (v, key) {
                        (Value::Map(mut m), k) => m.remove(&s(k)).unwrap_or(Value::Null),
                        (Value::List(l), Value::Int(i)) => l
                            .get(*i as usize)
                            .cloned()
                            .ok_or_else(|| self.error(pos, format!("index out of range: {i}")))?,
                        (other, _) => {
                            return Err(self
                                .error(pos, format!("can't index item of type {}", other.kind())));
                        }
                    };
                }
                v
            }
            "b64enc" => {
                want(1)?;
                Value::Str(base64(s(&args[0]).as_bytes()))
            }
            other => return Err(self.error(pos, format!("function {other:?} not implemented"))),
        })
    }
}

fn to_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Float(f) => Some(*f as i64),
        Value::Bool(b) => Some(i64::from(*b)),
        _ => None,
    }
}

/// Go's template comparison: same basic kind only (int vs float64 is an error, as Helm users
/// meet with numbers from values files), nil equals nil.
fn go_compare(a: &Value, b: &Value) -> Result<std::cmp::Ordering, String> {
    use std::cmp::Ordering;
    Ok(match (a, b) {
        (Value::Int(x), Value::Int(y)) => x.cmp(y),
        (Value::Float(x), Value::Float(y)) => x.partial_cmp(y).unwrap_or(Ordering::Less),
        (Value::Str(x), Value::Str(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) if x == y => Ordering::Equal,
        (Value::Bool(_), Value::Bool(_)) => Ordering::Less,
        (Value::Null, Value::Null) => Ordering::Equal,
        (x, y) => {
            return Err(format!(
                "incompatible types for comparison ({} and {})",
                x.kind(),
                y.kind()
            ));
        }
    })
}

/// Go's `%q` of a string (printable ASCII as is, JSON-like escapes otherwise).
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn go_printf(format: &str, args: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = format.chars();
    let mut next = 0;
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let verb = chars.next().ok_or("printf: format ends in %")?;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let arg = args
            .get(next)
            .ok_or_else(|| format!("printf: missing argument for %{verb}"))?;
        next += 1;
        match verb {
            's' | 'v' => out.push_str(&arg.to_go_string()),
            'd' => match arg {
                Value::Int(i) => out.push_str(&i.to_string()),
                other => out.push_str(&format!("%!d({}={})", other.kind(), other.to_go_string())),
            },
            'q' => out.push_str(&go_quote(&arg.to_go_string())),
            'g' => match arg {
                Value::Float(f) => out.push_str(&go_float_v(*f)),
                other => out.push_str(&other.to_go_string()),
            },
            other => return Err(format!("printf: verb %{other} not supported")),
        }
    }
    if next < args.len() {
        return Err(format!("printf: {} extra arguments", args.len() - next));
    }
    Ok(out)
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, values: &str) -> Result<String, TemplateError> {
        let mut set = TemplateSet::default();
        set.add_file("t.yaml", src)?;
        let y: serde_yaml_ng::Value = serde_yaml_ng::from_str(values).expect("values");
        let mut root = BTreeMap::new();
        root.insert("Values".to_owned(), Value::from(&y));
        set.render("t.yaml", &Value::Map(root))
    }

    #[test]
    fn trimming_and_conditionals_follow_go() {
        let src = "a:\n  {{- if .Values.on }}\n  b: {{ .Values.n }}\n  {{- else }}\n  b: off\n  {{- end }}\nc: 1\n";
        assert_eq!(
            render(src, "on: true\nn: 3").expect("render"),
            "a:\n  b: 3\nc: 1\n"
        );
        assert_eq!(
            render(src, "on: false").expect("render"),
            "a:\n  b: off\nc: 1\n"
        );
        assert_eq!(render("x{{/* c */}}y", "{}").expect("render"), "xy");
        let src =
            "{{ if eq .Values.m \"a\" }}A{{ else if eq .Values.m \"b\" }}B{{ else }}C{{ end }}";
        assert_eq!(render(src, "m: b").expect("render"), "B");
        assert_eq!(render(src, "m: z").expect("render"), "C");
    }

    #[test]
    fn range_with_and_variables() {
        let src = "{{ range $i, $v := .Values.l }}{{ $i }}={{ $v }};{{ end }}|{{ range $k, $v := .Values.m }}{{ $k }}:{{ $v }},{{ end }}|{{ with .Values.w }}{{ .x }}{{ else }}none{{ end }}|{{ $r := $.Values.n }}{{ $r }}";
        assert_eq!(
            render(src, "l: [a, b]\nm: {z: 1, a: 2}\nw: {x: 9}\nn: 1000000").expect("render"),
            "0=a;1=b;|a:2,z:1,|9|1e+06"
        );
    }

    #[test]
    fn include_pipes_and_helm_functions() {
        let src = "{{- define \"x\" -}}\nk: {{ .a | quote }}\n{{- end -}}\nroot:{{- include \"x\" .Values | nindent 2 }}\ny: {{ toYaml .Values.obj | nindent 2 }}\nj: {{ join \",\" .Values.l }}\nd: {{ .Values.missing | default \"dflt\" }}\n";
        let out = render(src, "a: hi\nobj: {b: [1, 2]}\nl: [x, y]").expect("render");
        assert_eq!(
            out,
            "root:\n  k: \"hi\"\ny: \n  b:\n  - 1\n  - 2\nj: x,y\nd: dflt\n"
        );
    }

    #[test]
    fn go_errors_are_kept() {
        let e = render("{{ if eq .Values.n 2 }}x{{ end }}", "n: 2").expect_err("int vs float64");
        assert!(e.message.contains("incompatible types"), "{e}");
        assert_eq!(
            render("{{ if eq .Values.n 2.0 }}x{{ end }}", "n: 2").expect("float"),
            "x"
        );
        let e = render("{{ .Values.a.b.c }}", "a: {}").expect_err("nil field");
        assert!(
            e.message.contains("nil pointer evaluating .Values.a.b.c"),
            "{e}"
        );
        let e = render("line\n  {{ fail \"no: way\" }}", "{}").expect_err("fail");
        assert!(
            e.refused && e.line == 2 && e.col == 3 && e.message == "no: way",
            "{e:?}"
        );
        let e = render("{{ frobnicate 1 }}", "{}").expect_err("unknown function");
        assert!(e.message.contains("\"frobnicate\" not defined"), "{e}");
        assert!(render("{{ if true }}", "{}").is_err());
        assert!(render("{{ end }}", "{}").is_err());
        assert_eq!(
            render("{{ and .Values.a .Values.a.b }}", "{}").expect("lazy and"),
            ""
        );
    }
}
