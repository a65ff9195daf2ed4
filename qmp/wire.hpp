// QMP wire format, without I/O: bytes to lines to typed messages, and commands to bytes.
//
// QMP is newline-delimited JSON over a stream socket. QEMU sends one greeting, then replies
// (`{"return":…,"id":…}` or `{"error":{"class":…,"desc":…},"id":…}`) and asynchronous events
// (`{"event":…,"data":…,"timestamp":…}`); the client sends `{"execute":…,"arguments":…,"id":…}`.
//
// Every byte from QEMU is hostile. LineDecoder frames lines in a buffer that never holds more than
// Limits::max_line bytes of one line plus one read; MessageParser (one per connection, reusing its
// JSON parser from line to line) turns one line into a typed Message, refusing invalid JSON,
// invalid UTF-8, nesting deeper than Limits::max_depth and parses needing more than
// Limits::max_message_memory. Any of these is a connection error: the stream cannot be trusted
// after it. encode_command() serializes a command and refuses anything QEMU's own parser would
// reject (so QEMU never needs to answer without an id).
#pragma once

#include <boost/json/object.hpp>
#include <boost/json/value.hpp>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "qmp/error.hpp"

namespace qmp {

struct Limits {
  // Longest line accepted from the peer. QEMU 7.2's query-qmp-schema reply is ~200 KiB.
  std::size_t max_line = std::size_t{8} << 20;
  // Deepest JSON nesting accepted, both ways. QEMU refuses input deeper than 1024; its replies
  // nest a few levels, plus one per backing file in query-block.
  std::size_t max_depth = 128;
  // Memory one parsed message may occupy (the JSON tree, not the text).
  std::size_t max_message_memory = std::size_t{32} << 20;
  // File descriptors the peer may attach to one read. QEMU never sends any.
  std::size_t max_fds = 0;
};

// Splits the incoming byte stream into lines. The buffer grows only as far as one line needs
// (at most max_line + 1 plus the last read). Once a line over 1 MiB has been consumed it shrinks
// back at the next read; a smaller one is kept until release_if_empty() (the client calls it
// whenever the socket is drained), so a backlog of large replies does not regrow it each time.
class LineDecoder {
 public:
  explicit LineDecoder(std::size_t max_line, std::size_t read_size = 8192);
  LineDecoder(const LineDecoder&) = delete;
  LineDecoder& operator=(const LineDecoder&) = delete;

  // Writable space for at least `n` bytes at the end of the buffer; then commit() what was read.
  std::span<char> prepare(std::size_t n);
  void commit(std::size_t n);
  // prepare + copy + commit, for tests and fuzzing.
  void feed(std::string_view bytes);

  // The next complete line without its "\n" or "\r\n", valid until the next call of any member;
  // an empty optional when more bytes are needed; errc::line_too_long once a line (complete or
  // not) exceeds max_line. Errors are sticky. Lines holding only whitespace are skipped.
  Result<std::optional<std::string_view>> next_line();

  // Frees the buffer when it holds no partial line (an idle connection keeps no read buffer).
  void release_if_empty();
  // Drops everything buffered and frees the buffer.
  void clear();

  std::size_t buffered() const noexcept { return end_ - begin_; }
  std::size_t capacity() const noexcept { return cap_; }
  std::size_t peak_capacity() const noexcept { return peak_cap_; }

 private:
  void reserve_tail(std::size_t n);

  std::size_t max_line_;
  std::size_t read_size_;
  std::unique_ptr<char[]> buf_;
  std::size_t cap_ = 0;
  std::size_t begin_ = 0;  // first unconsumed byte
  std::size_t end_ = 0;    // one past the last received byte
  std::size_t scan_ = 0;   // bytes before this index hold no '\n'
  std::size_t peak_cap_ = 0;
  bool failed_ = false;
};

// The id a reply carries. The client only sends non-negative integers, so anything else is
// foreign; an absent id is what QEMU sends when it could not read a command far enough.
struct ReplyId {
  enum class Kind { absent, number, foreign };
  Kind kind = Kind::absent;
  std::uint64_t number = 0;

  static ReplyId absent() { return {}; }
  static ReplyId of(std::uint64_t n) { return {Kind::number, n}; }
  friend bool operator==(const ReplyId&, const ReplyId&) = default;
};

struct Version {
  int major = 0;
  int minor = 0;
  int micro = 0;
  std::string package;

  bool at_least(int maj, int min, int mic = 0) const noexcept {
    if (major != maj) return major > maj;
    if (minor != min) return minor > min;
    return micro >= mic;
  }
  std::string to_string() const;
};

struct Greeting {
  Version version;
  std::vector<std::string> capabilities;  // e.g. "oob"
};

struct Return {
  ReplyId id;
  boost::json::value value;
};

struct ErrorReply {
  ReplyId id;
  std::string error_class;  // QMP "class", e.g. "GenericError"
  std::string desc;
};

struct Timestamp {
  std::int64_t seconds = 0;
  std::int64_t microseconds = 0;
};

struct Event {
  std::string name;          // e.g. "DEVICE_DELETED"
  boost::json::object data;  // empty when QEMU sent none
  Timestamp timestamp;
  std::size_t memory = 0;  // bytes the parsed message occupies (for queue budgets)
};

using Message = std::variant<Greeting, Return, ErrorReply, Event>;

// Parses lines (as returned by LineDecoder::next_line) into Messages. One per connection: the JSON
// parser and its work stack are kept from one line to the next instead of being built for each.
//
// Memory. The work stack (values of the containers still open, the text of the string being read)
// stays allocated between messages, up to 64 KiB; a message that needed more gives it back. The
// tree is built on the ordinary heap, so values outlive the parser like any other. While a line
// is parsed, the work stack (including what was kept) and the tree (each string, key, array and
// object as Boost.JSON lays it out) together may not exceed Limits::max_message_memory;
// Event::memory is what the event's tree takes.
//
// Errors: invalid_json, too_deep, message_too_large or unexpected_message; all of them are
// connection errors. The parser stays usable after one (each line is parsed on its own).
class MessageParser {
 public:
  explicit MessageParser(const Limits& limits);
  ~MessageParser();
  MessageParser(const MessageParser&) = delete;
  MessageParser& operator=(const MessageParser&) = delete;

  Result<Message> parse(std::string_view line);

  // Bytes of work stack kept for the next line.
  std::size_t retained() const noexcept;

 private:
  class Impl;
  std::unique_ptr<Impl> impl_;
};

// MessageParser(limits).parse(line): for a single line.
Result<Message> parse_message(std::string_view line, const Limits& limits);

// A command serialized up to its optional id. Ids are handed out in send order, so the id and
// closing brace are added only when the command is written. line() is the complete line with
// "\n", without an id (replies then match by position) or with one.
class EncodedCommand {
 public:
  const std::string& name() const noexcept { return name_; }
  std::string line(std::optional<std::uint64_t> id = std::nullopt) const;

 private:
  friend Result<EncodedCommand> encode_command(std::string_view, const boost::json::object&,
                                               const Limits&);
  std::string name_;
  std::string head_;
};

// Fails with invalid_command when the name is not a QMP identifier, an argument nests deeper
// than limits.max_depth, a string is not valid UTF-8 or holds U+0000 (QEMU refuses it), a
// number is not finite, or the line would exceed limits.max_line.
Result<EncodedCommand> encode_command(std::string_view name, const boost::json::object& args,
                                      const Limits& limits);

// True when `s` is well-formed UTF-8 (no overlongs, no surrogates, nothing above U+10FFFF).
bool is_valid_utf8(std::string_view s) noexcept;

}  // namespace qmp
