// Renders a Go text/template, as Ollama renders a Modelfile's TEMPLATE, for the tests of qadapt's Ollama
// export: render_template TEMPLATE_FILE < {"Messages": [{"Role": ..., "Content": ...}, ...]}
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	var values struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&values); err != nil {
		panic(err)
	}
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	if err := template.Must(template.New("modelfile").Parse(string(text))).Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
