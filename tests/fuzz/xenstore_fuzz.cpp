// Fuzz target for the bytes of xenstore: the wire decoder of the fake xenstored (tests/fakes),
// which reads what a client sends, and the broker's parsers of the values it reads back
// (broker/xen/device_model: the kill uid, the pid, the domids under /libxl, the guest type).
// xenstore is dom0's, but a guest can write beneath its own /local/domain/<domid>, so every value
// the broker reads from there is input from the guest.
//
// Input: the first byte picks how the rest is fed to the decoder (chunk size 1..256); the rest is
// a byte stream of messages. Every NUL-separated word of every decoded payload, and the whole
// input, also go through the value parsers (each distinct word once per input).
//
// Invariants checked (a violation aborts):
//  - the decoder yields a message only with a payload of at most 4096 bytes and the header's
//    length, and re-encoding that message gives back exactly the bytes it came from; after a bad
//    header or an oversized payload it yields that error for ever; the split is the same whatever
//    the chunk size (the stream is decoded twice: in chunks and whole);
//  - split_words then join_words gives the payload back, when the payload splits;
//  - a value the parsers accept prints back as itself (no sign, space or leading zero slips in),
//    and parse_guest_type accepts "hvm" and "pv" alone.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "broker/xen/device_model.hpp"
#include "xs_wire.hpp"

namespace {

namespace xs = qbtest::xs;

void check(bool ok) {
  if (!ok) std::abort();
}

void check_values(std::string_view v) {
  if (auto uid = broker::xen::parse_uid(v)) check(std::to_string(*uid) == v);
  if (auto pid = broker::xen::parse_pid(v)) check(std::to_string(*pid) == v && *pid >= 0);
  if (auto domid = broker::xen::parse_domid(v)) check(std::to_string(*domid) == v);
  auto type = broker::xen::parse_guest_type(v);
  check(type.has_value() == (v == "hvm" || v == "pv"));
  if (!type) check(type.error().field == "xen.type");
}

// The words of one input already given to the value parsers, which depend on the word alone: a
// payload of 4 096 NULs is 4 096 empty words, and parse_guest_type refuses each with a new error
// message. A table slot per hash of the word's bytes; a word whose slot another word took is
// parsed again, so no word goes unparsed.
class SeenWords {
 public:
  void next_input() { ++input_; }
  // True when `w` was not seen in this input (and is now).
  bool insert(std::string_view w) {
    std::uint32_t h = 2166136261u;  // FNV-1a
    for (const char c : w) h = (h ^ static_cast<unsigned char>(c)) * 16777619u;
    Slot& slot = slots_[h % kSlots];
    if (slot.input == input_ && slot.word == w) return false;
    slot = {input_, w};
    return true;
  }

 private:
  static constexpr std::size_t kSlots = 1024;
  struct Slot {
    std::uint64_t input = 0;
    std::string_view word;
  };
  std::uint64_t input_ = 1;
  Slot slots_[kSlots];
};

struct Decoded {
  std::vector<xs::Message> messages;
  xs::Decoder::Status end = xs::Decoder::Status::need_more;
};

Decoded decode(std::string_view stream, std::size_t chunk) {
  Decoded out;
  xs::Decoder d;
  std::size_t fed = 0;
  for (;;) {
    xs::Message m;
    const auto status = d.next(m);
    if (status == xs::Decoder::Status::message) {
      check(m.payload.size() <= xs::payload_max && m.payload.size() == m.header.len);
      out.messages.push_back(std::move(m));
      continue;
    }
    if (status != xs::Decoder::Status::need_more) {
      xs::Message again;
      check(d.next(again) == status);  // an error is for ever
      out.end = status;
      return out;
    }
    if (fed == stream.size()) return out;
    const std::size_t n = std::min(chunk, stream.size() - fed);
    d.feed(stream.substr(fed, n));
    fed += n;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const std::string_view input(reinterpret_cast<const char*>(data), size);
  const std::size_t chunk = static_cast<std::uint8_t>(input[0]) % 256 + 1;
  const std::string_view stream = input.substr(1);
  check_values(stream);

  const Decoded chunked = decode(stream, chunk);
  const Decoded whole = decode(stream, stream.size() + 1);
  check(chunked.end == whole.end && chunked.messages.size() == whole.messages.size());
  // Kept between inputs so that their storage is reused.
  static std::vector<std::string> copies;
  static SeenWords seen;
  seen.next_input();
  std::size_t offset = 0;
  for (std::size_t i = 0; i < chunked.messages.size(); ++i) {
    const auto& m = chunked.messages[i];
    check(m.payload == whole.messages[i].payload);
    const std::string bytes = xs::encode(m.header.type, m.header.req_id, m.header.tx_id, m.payload);
    check(stream.substr(offset, bytes.size()) == bytes);
    offset += bytes.size();
    if (auto words = xs::split_words(m.payload)) {
      copies.assign(words->begin(), words->end());
      check(xs::join_words(copies) == m.payload);
      for (auto w : *words) {
        if (seen.insert(w)) check_values(w);
      }
    }
  }
  return 0;
}
