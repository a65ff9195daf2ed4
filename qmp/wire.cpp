#include "qmp/wire.hpp"

#include <algorithm>
#include <boost/json/basic_parser_impl.hpp>
#include <boost/json/memory_resource.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/storage_ptr.hpp>
#include <boost/json/value_stack.hpp>
#include <cmath>
#include <cstring>
#include <new>

namespace qmp {
namespace json = boost::json;

// ---------------------------------------------------------------------------------------------
// LineDecoder

namespace {
constexpr std::size_t kKeepBuffer = std::size_t{1} << 20;
}  // namespace

LineDecoder::LineDecoder(std::size_t max_line, std::size_t read_size)
    : max_line_(max_line), read_size_(std::max<std::size_t>(read_size, 1)) {}

void LineDecoder::reserve_tail(std::size_t n) {
  if (begin_ == end_) {
    begin_ = end_ = scan_ = 0;
    // Give back what a very large line needed once it has been consumed. A smaller buffer is
    // kept while reads keep coming (the next large reply reuses it instead of growing and
    // faulting in fresh pages again) and given back by release_if_empty() once the socket is
    // drained.
    if (cap_ > std::max<std::size_t>(4 * read_size_, kKeepBuffer)) {
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

// What one parse may allocate: the work stack and the tree together.
struct Budget {
  std::size_t limit = 0;
  std::size_t used = 0;

  bool try_charge(std::size_t n) {
    if (n > limit - used) return false;
    used += n;
    return true;
  }
};

void* allocate_aligned(std::size_t n, std::size_t align) {
  if (align > __STDCPP_DEFAULT_NEW_ALIGNMENT__) return ::operator new(n, std::align_val_t(align));
  return ::operator new(n);
}

void deallocate_aligned(void* p, std::size_t align) {
  if (align > __STDCPP_DEFAULT_NEW_ALIGNMENT__) {
    ::operator delete(p, std::align_val_t(align));
  } else {
    ::operator delete(p);
  }
}

// The parser's work stack, kept from one message to the next. It charges what it holds to the
// budget of the parse in progress, so a hostile line is refused before it gets far.
class StackResource final : public json::memory_resource {
 public:
  explicit StackResource(Budget& budget) : budget_(budget) {}
  std::size_t held() const noexcept { return held_; }

 private:
  void* do_allocate(std::size_t n, std::size_t align) override {
    if (!budget_.try_charge(n)) throw std::bad_alloc();  // stops the parse (see parse())
    void* p = allocate_aligned(n, align);
    held_ += n;
    return p;
  }
  void do_deallocate(void* p, std::size_t n, std::size_t align) override {
    deallocate_aligned(p, align);
    held_ -= n;
    budget_.used -= std::min(n, budget_.used);
  }
  bool do_is_equal(const json::memory_resource& other) const noexcept override {
    return this == &other;
  }

  Budget& budget_;
  std::size_t held_ = 0;
};

// Heap bytes one allocation of `n` bytes takes (glibc: 8 bytes of header, 16-byte granules, at
// least 32), so the budget counts what the tree really holds.
constexpr std::size_t heap_bytes(std::size_t n) {
  return std::max<std::size_t>(32, (n + 8 + 15) & ~std::size_t{15});
}

// Builds the tree the way Boost.JSON's own parser does (a value_stack fed by basic_parser), on
// the default heap, and charges each string, key, array and object to the budget as Boost.JSON
// 1.81 lays them out. Counting here rather than in an allocator lets the tree use plain heap
// storage: values outlive the parser (a reply goes to its caller, an event to subscriptions)
// and need no reference-counted resource, whose atomic count per node would cost more than the
// parse itself on small messages.
class TreeBuilder {
 public:
  // What basic_parser asks of a handler.
  static constexpr std::size_t max_object_size = json::object::max_size();
  static constexpr std::size_t max_array_size = json::array::max_size();
  static constexpr std::size_t max_key_size = json::string::max_size();
  static constexpr std::size_t max_string_size = json::string::max_size();

  TreeBuilder(json::storage_ptr stack, Budget& budget) : st(std::move(stack)), budget_(budget) {}

  // Starts a message. `tree` is what the tree has taken so far: Event::memory.
  void reset() {
    st.reset();
    tree = 0;
    over_budget = false;
  }

  json::value_stack st;
  std::size_t tree = 0;
  bool over_budget = false;

  bool on_document_begin(json::error_code&) { return true; }
  bool on_document_end(json::error_code&) { return true; }
  bool on_object_begin(json::error_code&) { return true; }
  bool on_object_end(std::size_t n, json::error_code& ec) {
    // The table: a header, then per entry a key_value_pair and a hash bucket.
    if (n > 0 && !charge(heap_bytes(32 + n * (sizeof(json::key_value_pair) + 4)), ec)) {
      return false;
    }
    st.push_object(n);
    return true;
  }
  bool on_array_begin(json::error_code&) { return true; }
  bool on_array_end(std::size_t n, json::error_code& ec) {
    if (n > 0 && !charge(heap_bytes(16 + n * sizeof(json::value)), ec)) return false;
    st.push_array(n);
    return true;
  }
  bool on_key_part(json::string_view s, std::size_t, json::error_code&) {
    st.push_chars(s);
    return true;
  }
  bool on_key(json::string_view s, std::size_t n, json::error_code& ec) {
    if (!charge(heap_bytes(n + 1), ec)) return false;  // keys are always allocated
    st.push_key(s);
    return true;
  }
  bool on_string_part(json::string_view s, std::size_t, json::error_code&) {
    st.push_chars(s);
    return true;
  }
  bool on_string(json::string_view s, std::size_t n, json::error_code& ec) {
    // Up to 14 characters live inside the value itself.
    if (n > 14 && !charge(heap_bytes(8 + n + 1), ec)) return false;
    st.push_string(s);
    return true;
  }
  bool on_number_part(json::string_view, json::error_code&) { return true; }
  bool on_int64(std::int64_t i, json::string_view, json::error_code&) {
    st.push_int64(i);
    return true;
  }
  bool on_uint64(std::uint64_t u, json::string_view, json::error_code&) {
    st.push_uint64(u);
    return true;
  }
  bool on_double(double d, json::string_view, json::error_code&) {
    st.push_double(d);
    return true;
  }
  bool on_bool(bool b, json::error_code&) {
    st.push_bool(b);
    return true;
  }
  bool on_null(json::error_code&) {
    st.push_null();
    return true;
  }
  bool on_comment_part(json::string_view, json::error_code&) { return true; }
  bool on_comment(json::string_view, json::error_code&) { return true; }

 private:
  bool charge(std::size_t n, json::error_code& ec) {
    tree += n;
    if (budget_.try_charge(n)) return true;
    over_budget = true;
    ec = json::error::exception;  // any error stops the parser; over_budget says which
    return false;
  }

  Budget& budget_;
};

Error unexpected(std::string what) {
  return {errc::unexpected_message, std::move(what)};
}

ReplyId reply_id(const json::value* id) {
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

// The members of a message's top-level object that QMP defines, found in one pass (a message has
// a handful of members; looking each one up would scan them once per name).
struct Members {
  json::value* qmp = nullptr;
  json::value* event = nullptr;
  json::value* ret = nullptr;
  json::value* error = nullptr;
  json::value* id = nullptr;
  json::value* timestamp = nullptr;
  json::value* data = nullptr;

  explicit Members(json::object& o) {
    for (auto& kv : o) {
      if (json::value** slot = find(kv.key())) *slot = &kv.value();
    }
  }

  json::value** find(std::string_view k) {
    switch (k.size()) {
      case 2:
        return k == "id" ? &id : nullptr;
      case 3:
        return k == "QMP" ? &qmp : nullptr;
      case 4:
        return k == "data" ? &data : nullptr;
      case 5:
        return k == "event" ? &event : k == "error" ? &error : nullptr;
      case 6:
        return k == "return" ? &ret : nullptr;
      case 9:
        return k == "timestamp" ? &timestamp : nullptr;
      default:
        return nullptr;
    }
  }
  int kinds() const {
    return static_cast<int>(qmp != nullptr) + static_cast<int>(event != nullptr) +
           static_cast<int>(ret != nullptr) + static_cast<int>(error != nullptr);
  }
};

Result<Event> parse_event(Members& m, std::size_t memory) {
  if (!m.event->is_string()) return unexpected("event: name is not a string");
  const json::value* ts = m.timestamp;
  if (ts == nullptr || !ts->is_object()) return unexpected("event: missing timestamp");
  std::optional<std::int64_t> sec;
  std::optional<std::int64_t> usec;
  for (const auto& kv : ts->get_object()) {
    if (kv.key() == "seconds") sec = as_int(&kv.value());
    if (kv.key() == "microseconds") usec = as_int(&kv.value());
  }
  if (!sec || !usec) return unexpected("event: bad timestamp");
  if (m.data != nullptr && !m.data->is_object()) {
    return unexpected("event: data is not an object");
  }
  // Move-construct: takes the table over instead of copying it.
  json::object d =
      m.data != nullptr ? json::object(std::move(m.data->get_object())) : json::object();
  return Event{std::string(m.event->get_string()), std::move(d), Timestamp{*sec, *usec}, memory};
}

Result<Message> parse_error(const Members& m) {
  const json::object* eo = m.error->if_object();
  const json::value* cls = eo != nullptr ? eo->if_contains("class") : nullptr;
  const json::value* desc = eo != nullptr ? eo->if_contains("desc") : nullptr;
  if (cls == nullptr || !cls->is_string() || desc == nullptr || !desc->is_string()) {
    return unexpected("error reply without class and desc strings");
  }
  return Message{
      ErrorReply{reply_id(m.id), std::string(cls->get_string()), std::string(desc->get_string())}};
}

// Turns a parsed JSON value into the QMP message it holds.
Result<Message> interpret(json::value& root, std::size_t memory) {
  json::object* o = root.if_object();
  if (o == nullptr) return unexpected("message is not a JSON object");
  Members m(*o);
  if (m.kinds() != 1) return unexpected("message is not exactly one of greeting, event or reply");
  if (m.ret != nullptr) {
    // Move-construct: takes the tree over instead of copying it.
    return Message{Return{reply_id(m.id), json::value(std::move(*m.ret))}};
  }
  if (m.event != nullptr) {
    auto e = parse_event(m, memory);
    if (!e) return e.error();
    return Message{std::move(*e)};
  }
  if (m.error != nullptr) return parse_error(m);
  auto g = parse_greeting(*m.qmp);
  if (!g) return g.error();
  return Message{std::move(*g)};
}

}  // namespace

std::string Version::to_string() const {
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(micro);
}

// ---------------------------------------------------------------------------------------------
// MessageParser

class MessageParser::Impl {
 public:
  explicit Impl(const Limits& limits) : limits_(limits), stack_(budget_) {
    budget_.limit = limits.max_message_memory;
    opt_.max_depth = limits.max_depth;
    opt_.allow_invalid_utf8 = false;
  }

  Result<Message> parse(std::string_view line) {
    if (!parser_) parser_.emplace(opt_, json::storage_ptr(&stack_), budget_);
    TreeBuilder& tree = parser_->handler();
    budget_.used = stack_.held();
    json::error_code ec;
    bool over_budget = false;
    // An optional so the tree is move-constructed into place.
    std::optional<json::value> root;
    try {
      parser_->reset();
      tree.reset();
      const std::size_t n = parser_->write_some(false, line.data(), line.size(), ec);
      if (!ec && n < line.size()) ec = json::error::extra_data;
      if (!ec) root.emplace(tree.st.release());
    } catch (const std::bad_alloc&) {
      over_budget = true;  // the work stack
    }
    over_budget = over_budget || tree.over_budget;
    const std::size_t memory = tree.tree;
    // A failed parse may leave values of this message on the stack, and a large one a large
    // stack: either way the next line starts with a new parser.
    if (over_budget || ec || stack_.held() > kKeepStack) parser_.reset();
    if (over_budget) {
      return Error{
          errc::message_too_large,
          "message needs more than " + std::to_string(limits_.max_message_memory) + " bytes"};
    }
    if (ec == json::error::too_deep) {
      return Error{errc::too_deep, "JSON nested deeper than " + std::to_string(limits_.max_depth)};
    }
    if (ec) return Error{errc::invalid_json, ec.message()};
    return interpret(*root, memory);
  }

  std::size_t retained() const noexcept { return stack_.held(); }

 private:
  static constexpr std::size_t kKeepStack = std::size_t{64} << 10;

  Limits limits_;
  json::parse_options opt_;
  Budget budget_;
  StackResource stack_;
  std::optional<json::basic_parser<TreeBuilder>> parser_;  // after stack_: it allocates from it
};

MessageParser::MessageParser(const Limits& limits) : impl_(std::make_unique<Impl>(limits)) {}
MessageParser::~MessageParser() = default;

Result<Message> MessageParser::parse(std::string_view line) {
  return impl_->parse(line);
}

std::size_t MessageParser::retained() const noexcept {
  return impl_->retained();
}

Result<Message> parse_message(std::string_view line, const Limits& limits) {
  return MessageParser(limits).parse(line);
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
