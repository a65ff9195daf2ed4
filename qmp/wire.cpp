#include "qmp/wire.hpp"

#include <algorithm>
#include <boost/json/memory_resource.hpp>
#include <boost/json/parser.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/storage_ptr.hpp>
#include <cmath>
#include <cstring>
#include <new>

namespace qmp {
namespace json = boost::json;

// ---------------------------------------------------------------------------------------------
// LineDecoder

LineDecoder::LineDecoder(std::size_t max_line, std::size_t read_size)
    : max_line_(max_line), read_size_(std::max<std::size_t>(read_size, 1)) {}

void LineDecoder::reserve_tail(std::size_t n) {
  if (begin_ == end_) {
    begin_ = end_ = scan_ = 0;
    // Give back what one large line needed once it has been consumed.
    if (cap_ > std::max<std::size_t>(4 * read_size_, 64 * 1024)) {
      buf_.reset();
      cap_ = 0;
    }
  }
  if (cap_ - end_ >= n) return;
  if (begin_ > 0) {
    std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
    end_ -= begin_;
    scan_ -= begin_;
    begin_ = 0;
    if (cap_ - end_ >= n) return;
  }
  // end_ never exceeds max_line + 1 here (next_line() fails first), so capacity stays within
  // max_line + 1 + n.
  std::size_t need = end_ + n;
  std::size_t grown = std::max(cap_ * 2, read_size_);
  std::size_t cap = std::clamp(grown, need, std::max(need, max_line_ + 1 + n));
  auto fresh = std::make_unique_for_overwrite<char[]>(cap);
  if (end_ > 0) std::memcpy(fresh.get(), buf_.get(), end_);
  buf_ = std::move(fresh);
  cap_ = cap;
  peak_cap_ = std::max(peak_cap_, cap_);
}

void LineDecoder::release_if_empty() {
  if (begin_ != end_) return;
  buf_.reset();
  cap_ = begin_ = end_ = scan_ = 0;
}

void LineDecoder::clear() {
  buf_.reset();
  cap_ = begin_ = end_ = scan_ = 0;
}

std::span<char> LineDecoder::prepare(std::size_t n) {
  n = std::max<std::size_t>(n, 1);
  reserve_tail(n);
  return {buf_.get() + end_, n};
}

void LineDecoder::commit(std::size_t n) {
  if (failed_) return;
  end_ = std::min(end_ + n, cap_);
}

void LineDecoder::feed(std::string_view bytes) {
  while (!bytes.empty() && !failed_) {
    std::size_t n = std::min(bytes.size(), read_size_);
    auto dst = prepare(n);
    std::memcpy(dst.data(), bytes.data(), n);
    commit(n);
    bytes.remove_prefix(n);
    // Stop once the pending line is past the bound: next_line() reports it, and the buffer
    // never grows further (the client checks after every read the same way).
    if (end_ - begin_ > max_line_ + 1 &&
        std::memchr(buf_.get() + scan_, '\n', end_ - scan_) == nullptr) {
      break;
    }
  }
}

Result<std::optional<std::string_view>> LineDecoder::next_line() {
  auto too_long = [this]() -> Error {
    failed_ = true;
    buf_.reset();
    cap_ = begin_ = end_ = scan_ = 0;
    return {errc::line_too_long, "line longer than " + std::to_string(max_line_) + " bytes"};
  };
  if (failed_) return too_long();
  for (;;) {
    const char* base = buf_.get();
    const void* nl = end_ > scan_ ? std::memchr(base + scan_, '\n', end_ - scan_) : nullptr;
    if (nl == nullptr) {
      scan_ = end_;
      // A trailing '\r' may be the start of "\r\n": it does not count yet.
      std::size_t partial = end_ - begin_;
      if (partial > 0 && base[end_ - 1] == '\r') --partial;
      if (partial > max_line_) return too_long();
      return std::optional<std::string_view>{};
    }
    std::size_t pos = static_cast<std::size_t>(static_cast<const char*>(nl) - base);
    std::string_view line(base + begin_, pos - begin_);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.size() > max_line_) return too_long();
    begin_ = scan_ = pos + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    return std::optional<std::string_view>{line};
  }
}

// ---------------------------------------------------------------------------------------------
// Parsing

namespace {

// Counts what one message allocates and refuses to go past its budget. Both the parser's work
// stack and the resulting tree live here, so a hostile line costs at most the budget.
class BudgetResource final : public json::memory_resource {
 public:
  // make_shared_resource() keeps the resource inside a wrapper; `self` learns where it lives.
  BudgetResource(std::size_t budget, BudgetResource** self) : budget_(budget) { *self = this; }
  std::size_t used() const noexcept { return used_; }

 private:
  void* do_allocate(std::size_t n, std::size_t align) override {
    if (n > budget_ - used_) throw std::bad_alloc();
    void* p = align > __STDCPP_DEFAULT_NEW_ALIGNMENT__ ? ::operator new(n, std::align_val_t(align))
                                                       : ::operator new(n);
    used_ += n;
    return p;
  }
  void do_deallocate(void* p, std::size_t n, std::size_t align) override {
    if (align > __STDCPP_DEFAULT_NEW_ALIGNMENT__) {
      ::operator delete(p, std::align_val_t(align));
    } else {
      ::operator delete(p);
    }
    used_ -= n;
  }
  bool do_is_equal(const json::memory_resource& other) const noexcept override {
    return this == &other;
  }

  std::size_t budget_;
  std::size_t used_ = 0;
};

Error unexpected(std::string what) {
  return {errc::unexpected_message, std::move(what)};
}

ReplyId reply_id(const json::object& o) {
  const json::value* id = o.if_contains("id");
  if (id == nullptr) return ReplyId::absent();
  if (id->is_uint64()) return ReplyId::of(id->get_uint64());
  if (id->is_int64() && id->get_int64() >= 0) {
    return ReplyId::of(static_cast<std::uint64_t>(id->get_int64()));
  }
  return {ReplyId::Kind::foreign, 0};
}

std::optional<std::int64_t> as_int(const json::value* v) {
  if (v == nullptr) return std::nullopt;
  if (v->is_int64()) return v->get_int64();
  if (v->is_uint64() && v->get_uint64() <= static_cast<std::uint64_t>(INT64_MAX)) {
    return static_cast<std::int64_t>(v->get_uint64());
  }
  return std::nullopt;
}

Result<Greeting> parse_greeting(const json::value& qmp) {
  const json::object* o = qmp.if_object();
  if (o == nullptr) return unexpected("greeting: \"QMP\" is not an object");
  const json::value* ver = o->if_contains("version");
  const json::value* caps = o->if_contains("capabilities");
  if (ver == nullptr || !ver->is_object() || caps == nullptr || !caps->is_array()) {
    return unexpected("greeting: missing version or capabilities");
  }
  const json::value* qemu = ver->get_object().if_contains("qemu");
  if (qemu == nullptr || !qemu->is_object()) return unexpected("greeting: missing version.qemu");
  const json::object& q = qemu->get_object();
  auto major = as_int(q.if_contains("major"));
  auto minor = as_int(q.if_contains("minor"));
  auto micro = as_int(q.if_contains("micro"));
  if (!major || !minor || !micro || *major < 0 || *major > 9999 || *minor < 0 || *minor > 9999 ||
      *micro < 0 || *micro > 9999) {
    return unexpected("greeting: bad version numbers");
  }
  Greeting g;
  g.version.major = static_cast<int>(*major);
  g.version.minor = static_cast<int>(*minor);
  g.version.micro = static_cast<int>(*micro);
  if (const json::value* pkg = ver->get_object().if_contains("package"); pkg && pkg->is_string()) {
    g.version.package = std::string(pkg->get_string());
  }
  for (const json::value& c : caps->get_array()) {
    if (!c.is_string()) return unexpected("greeting: capability is not a string");
    g.capabilities.emplace_back(c.get_string());
  }
  return g;
}

Result<Event> parse_event(json::object& o, std::size_t memory) {
  const json::value* name = o.if_contains("event");
  if (!name->is_string()) return unexpected("event: name is not a string");
  const json::value* ts = o.if_contains("timestamp");
  if (ts == nullptr || !ts->is_object()) return unexpected("event: missing timestamp");
  auto sec = as_int(ts->get_object().if_contains("seconds"));
  auto usec = as_int(ts->get_object().if_contains("microseconds"));
  if (!sec || !usec) return unexpected("event: bad timestamp");
  json::value* data = o.if_contains("data");
  if (data != nullptr && !data->is_object()) return unexpected("event: data is not an object");
  // Move-construct the data so it keeps the message's storage (move-assigning would copy).
  json::object d =
      data != nullptr ? json::object(std::move(data->get_object())) : json::object(o.storage());
  return Event{std::string(name->get_string()), std::move(d), Timestamp{*sec, *usec}, memory};
}

}  // namespace

std::string Version::to_string() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(micro);
}

Result<Message> parse_message(std::string_view line, const Limits& limits) {
  BudgetResource* budget = nullptr;
  json::storage_ptr sp =
      json::make_shared_resource<BudgetResource>(limits.max_message_memory, &budget);
  json::parse_options opt;
  opt.max_depth = limits.max_depth;
  opt.allow_invalid_utf8 = false;

  boost::system::error_code ec;
  // An optional so the tree is move-constructed into place and keeps its storage.
  std::optional<json::value> root;
  try {
    json::parser p(sp, opt);
    p.reset(sp);
    p.write(line.data(), line.size(), ec);
    if (!ec) root.emplace(p.release());
  } catch (const std::bad_alloc&) {
    return Error{errc::message_too_large,
                 "message needs more than " + std::to_string(limits.max_message_memory) + " bytes"};
  }
  if (ec == json::error::too_deep) {
    return Error{errc::too_deep, "JSON nested deeper than " + std::to_string(limits.max_depth)};
  }
  if (ec) return Error{errc::invalid_json, ec.message()};

  json::object* o = root->if_object();
  if (o == nullptr) return unexpected("message is not a JSON object");
  int kinds = static_cast<int>(o->contains("QMP")) + static_cast<int>(o->contains("event")) +
              static_cast<int>(o->contains("return")) + static_cast<int>(o->contains("error"));
  if (kinds != 1) return unexpected("message is not exactly one of greeting, event or reply");

  if (const json::value* qmp = o->if_contains("QMP")) {
    auto g = parse_greeting(*qmp);
    if (!g) return g.error();
    return Message{std::move(*g)};
  }
  if (o->contains("event")) {
    auto e = parse_event(*o, budget->used());
    if (!e) return e.error();
    return Message{std::move(*e)};
  }
  if (json::value* ret = o->if_contains("return")) {
    // Move-construct: the value keeps the message's storage instead of being copied.
    return Message{Return{reply_id(*o), json::value(std::move(*ret))}};
  }
  const json::value* err = o->if_contains("error");
  const json::object* eo = err->if_object();
  const json::value* cls = eo != nullptr ? eo->if_contains("class") : nullptr;
  const json::value* desc = eo != nullptr ? eo->if_contains("desc") : nullptr;
  if (cls == nullptr || !cls->is_string() || desc == nullptr || !desc->is_string()) {
    return unexpected("error reply without class and desc strings");
  }
  return Message{
      ErrorReply{reply_id(*o), std::string(cls->get_string()), std::string(desc->get_string())}};
}

// ---------------------------------------------------------------------------------------------
// Encoding

bool is_valid_utf8(std::string_view s) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned c = *p;
    if (c < 0x80) {
      ++p;
      continue;
    }
    std::size_t len;
    unsigned cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (static_cast<std::size_t>(end - p) < len) return false;
    for (std::size_t i = 1; i < len; ++i) {
      if ((p[i] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    p += len;
  }
  return true;
}

namespace {

bool is_qmp_name(std::string_view name) {
  if (name.empty() || name.size() > 128) return false;
  return std::all_of(name.begin(), name.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
  });
}

bool ok_string(std::string_view s) {
  return is_valid_utf8(s) && s.find('\0') == std::string_view::npos;
}

// Why a value cannot be sent, or an empty string.
std::string check_value(const json::value& v, std::size_t depth, std::size_t max_depth) {
  switch (v.kind()) {
    case json::kind::string:
      return ok_string(v.get_string()) ? "" : "string is not valid UTF-8 or holds NUL";
    case json::kind::double_:
      return std::isfinite(v.get_double()) ? "" : "number is not finite";
    case json::kind::array:
      if (depth + 1 > max_depth) return "arguments nest too deeply";
      for (const json::value& e : v.get_array()) {
        if (auto why = check_value(e, depth + 1, max_depth); !why.empty()) return why;
      }
      return "";
    case json::kind::object:
      if (depth + 1 > max_depth) return "arguments nest too deeply";
      for (const auto& kv : v.get_object()) {
        if (!ok_string(kv.key())) return "key is not valid UTF-8 or holds NUL";
        if (auto why = check_value(kv.value(), depth + 1, max_depth); !why.empty()) return why;
      }
      return "";
    default:
      return "";
  }
}

}  // namespace

std::string EncodedCommand::line(std::optional<std::uint64_t> id) const {
  std::string out;
  out.reserve(head_.size() + 32);
  out += head_;
  if (id) {
    out += R"(,"id":)";
    out += std::to_string(*id);
  }
  out += "}\n";
  return out;
}

Result<EncodedCommand> encode_command(std::string_view name, const json::object& args,
                                      const Limits& limits) {
  if (!is_qmp_name(name)) {
    return Error{errc::invalid_command,
                 "not a QMP command name: \"" + std::string(name.substr(0, 64)) + "\""};
  }
  // The command object is level 1 and "arguments" level 2.
  for (const auto& kv : args) {
    if (!ok_string(kv.key())) {
      return Error{errc::invalid_command,
                   std::string(name) + ": key is not valid UTF-8 or holds NUL"};
    }
    if (auto why = check_value(kv.value(), 2, limits.max_depth); !why.empty()) {
      return Error{errc::invalid_command, std::string(name) + ": " + why};
    }
  }
  EncodedCommand c;
  c.name_ = std::string(name);
  c.head_.reserve(64);
  c.head_ += R"({"execute":")";
  c.head_ += name;
  c.head_ += '"';
  if (!args.empty()) {
    c.head_ += R"(,"arguments":)";
    c.head_ += json::serialize(args);
  }
  if (c.head_.size() + 32 > limits.max_line) {
    return Error{errc::invalid_command, std::string(name) + ": command longer than " +
                                            std::to_string(limits.max_line) + " bytes"};
  }
  return c;
}

}  // namespace qmp
